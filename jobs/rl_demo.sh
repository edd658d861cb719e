#!/usr/bin/env bash
# Fine-tune partly -> GRPO on the task's reward -> score -> serve, on a laptop CPU. Takes the tiny model jobs/demo.sh
# pretrained (pretraining it only when jobs/demo.sh has not run here), fine-tunes it only partly on the word-category
# task (jobs/sft_tiny.yaml, 40 steps; reused when jobs/preference_demo.sh made it), then trains it with GRPO
# (jobs/grpo_tiny.yaml: LoRA, 8 completions per training prompt generated on llmray's serving engine inside each
# worker, rewarded 1 for the right category), prints held-out accuracy before and after, and asks the GRPO model one
# question through the OpenAI chat endpoint. Extra arguments are overrides of the GRPO recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
. jobs/_demo_steps.sh
demo_base_and_task
STAMP=$(date +%Y%m%d-%H%M%S)
if [ ! -f demo/sft_partial/config.json ]; then
  echo "== a partly fine-tuned model: full fine-tuning, 40 steps"
  llmray finetune jobs/sft_tiny.yaml "run.name=sft-partial-$STAMP" finetune.method=full train.lr=1e-3 \
    train.max_steps=40 train.warmup_steps=5 train.eval_every=0 train.checkpoint_every=40
  llmray export "runs/sft-partial-$STAMP" --out demo/sft_partial --overwrite
fi
python jobs/chat_task.py demo/rl --prompts
echo "== before GRPO: held-out prompts"
llmray eval demo/sft_partial --task tasks/word_category.yaml --out demo/rl/before.json
echo "== GRPO with LoRA, rewarded for the right category"
RUN="grpo-demo-$STAMP"
llmray finetune jobs/grpo_tiny.yaml "run.name=$RUN" "$@"
llmray export "runs/$RUN" --out demo/grpo --overwrite
echo "== after GRPO: held-out prompts"
llmray eval demo/grpo --task tasks/word_category.yaml --out demo/rl/after.json
python - <<'PY'
import json
before = json.load(open("demo/rl/before.json"))["tasks"]["word_category"]["accuracy"]
after = json.load(open("demo/rl/after.json"))["tasks"]["word_category"]["accuracy"]
print(f"held-out accuracy: {before:.1%} before GRPO, {after:.1%} after ({(after - before) * 100:+.1f} points)")
PY
ask_served demo/grpo grpo "${PORT:-8013}" tiger
