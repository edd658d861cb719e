# Steps the word-category demos share (sourced by jobs/finetune_demo.sh and jobs/preference_demo.sh, from the
# repository root).

# demo/export: the model jobs/demo.sh pretrained, when it has run here (its newest run with a checkpoint); else
# pretrain it now. Then the task's conversations in demo/chat.
demo_base_and_task() {
  if [ ! -f demo/export/config.json ]; then
    local base
    base=$(ls -dt runs/demo-*/checkpoint_* 2>/dev/null | head -n 1 | xargs -r dirname)
    if [ -z "$base" ]; then
      bash jobs/demo.sh run.name=demo-base
      base=runs/demo-base
    fi
    llmray export "$base" --out demo/export --overwrite
  fi
  python jobs/chat_task.py demo/chat
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
