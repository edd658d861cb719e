#!/usr/bin/env bash
# The whole path on a fresh machine with nothing of the user's: shard the interpreter's own standard
# library, train a BPE tokenizer on it, pretrain a tiny Llama with two ZeRO-2 workers on a local Ray
# cluster, print a generated sample. Extra arguments are recipe overrides, e.g. train.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p demo
if [ ! -f demo/shards/_manifest.json ]; then
  llmray data shard "$STDLIB" --include '*.py' --exclude '*/site-packages/*' --exclude '*/test/*' --out demo/shards --shard-size 4MB --overwrite
fi
if [ ! -f demo/tok/tokenizer.json ]; then
  llmray tokenizer train demo/shards --vocab-size 4000 --out demo/tok
fi
llmray train jobs/pretrain_tiny.yaml "run.name=demo-$(date +%Y%m%d-%H%M%S)" "$@"
