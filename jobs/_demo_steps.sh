# Steps the demos share (sourced by jobs/finetune_demo.sh, jobs/preference_demo.sh, jobs/rl_demo.sh and
# jobs/vision_demo.sh, from the repository root).

# demo/export: the model jobs/demo.sh pretrained, when it has run here (its newest run with a checkpoint); else
# pretrain it now.
demo_base() {
  if [ ! -f demo/export/config.json ]; then
    local base
    # `|| true`: with no run yet, ls fails, and under `set -eo pipefail` that would end the script here
    base=$(ls -dt runs/demo-*/checkpoint_* 2>/dev/null | head -n 1 | xargs -r dirname || true)
    if [ -z "$base" ]; then
      bash jobs/demo.sh run.name=demo-base
      base=runs/demo-base
    fi
    llmray export "$base" --out demo/export --overwrite
  fi
}

# demo/export (demo_base), then the word-category task's conversations in demo/chat.
demo_base_and_task() {
  demo_base
  python jobs/chat_task.py demo/chat
}

# demo/sft_partial: the demo model fine-tuned only partly on the task (full fine-tuning, 40 steps), what the
# preference and RL demos start from; made once, reused after (the same recipe and seed make the same model). Its
# base and the task's conversations first (demo_base_and_task).
demo_partial_model() {
  demo_base_and_task
  if [ ! -f demo/sft_partial/config.json ]; then
    local run
    run="sft-partial-$(date +%Y%m%d-%H%M%S)"
    echo "== a partly fine-tuned model: full fine-tuning, 40 steps"
    llmray finetune jobs/sft_tiny.yaml "run.name=$run" finetune.method=full train.lr=1e-3 \
      train.max_steps=40 train.warmup_steps=5 train.eval_every=0 train.checkpoint_every=40
    llmray export "runs/$run" --out demo/sft_partial --overwrite
  fi
}

# ask_served FOLDER NAME PORT WORD: serve FOLDER as NAME on PORT, ask what kind of thing WORD is through the OpenAI
# chat endpoint, print the answer; the server stops when the script exits.
ask_served() {
  local folder=$1 name=$2 port=$3 word=$4
  echo "== one question through the OpenAI chat endpoint"
  llmray serve "$folder" --name "$name" --port "$port" > "demo/serve_$name.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break; sleep 1; done
  curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "'"$name"'", "messages": [{"role": "user", "content": "What kind of thing is '"'"$word"'"'?"}], "max_tokens": 8, "temperature": 0}'
  echo
}
