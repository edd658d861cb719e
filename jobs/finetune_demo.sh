#!/usr/bin/env bash
# Pretrain -> fine-tune -> score -> serve, on a laptop CPU. Takes the tiny model jobs/demo.sh pretrained (and pretrains
# it only when jobs/demo.sh has not run here), fine-tunes it with LoRA (jobs/sft_tiny.yaml) on a generated task whose
# answers a script checks (the category of a word), prints exact-match accuracy on held-out prompts before and after,
# then asks the fine-tuned model one question through the OpenAI chat endpoint. Extra arguments are overrides of the
# fine-tuning recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
if [ ! -f demo/export/config.json ]; then
  # the model jobs/demo.sh pretrained, when it has run here (its newest run with a checkpoint); else pretrain it now
  BASE=$(ls -dt runs/demo-*/checkpoint_* 2>/dev/null | head -n 1 | xargs -r dirname)
  if [ -z "$BASE" ]; then
    bash jobs/demo.sh run.name=demo-base
    BASE=runs/demo-base
  fi
  llmray export "$BASE" --out demo/export --overwrite
fi
python jobs/chat_task.py demo/chat
echo "== before fine-tuning: held-out prompts (tasks/word_category.yaml)"
llmray eval demo/export --task tasks/word_category.yaml --out demo/eval_before.json
RUN="sft-demo-$(date +%Y%m%d-%H%M%S)"
llmray finetune jobs/sft_tiny.yaml "run.name=$RUN" "$@"
llmray export "runs/$RUN" --out demo/sft --overwrite
echo "== after fine-tuning"
llmray eval demo/sft --task tasks/word_category.yaml --out demo/eval_after.json
echo "== one question through the OpenAI chat endpoint"
PORT="${PORT:-8011}"
llmray serve demo/sft --name sft --port "$PORT" > demo/serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break; sleep 1; done
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "sft", "messages": [{"role": "user", "content": "What kind of thing is '"'"'mango'"'"'?"}], "max_tokens": 8, "temperature": 0}'
echo
