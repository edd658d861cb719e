#!/usr/bin/env bash
# A vision-language model from parts, on a laptop CPU: Pillow-drawn scenes of shapes (jobs/vision_task.py: "What
# colour is the square?", "What shape is blue?", "How many red circles?"; 1200 training scenes, 80 held out, three
# questions each), a random-init CLIP vision tower made from a config (nothing downloaded), the tiny language model
# jobs/demo.sh pretrained (demo/export; pretrained here only when jobs/demo.sh has not run), composed with a new
# projector by `llmray vision compose`, then LLaVA's two stages with `llmray finetune` (jobs/vision_tiny.yaml): stage 1
# the projector alone on captions, stage 2 the projector and the language model on the questions, the tower frozen.
# Held-out accuracy (greedy answers, exact match after normalising) is printed before and after. The last step asks
# one held-out question through the official OpenAI client, the image a data: URI.
#
# Measured (2 CPU cores shared with two other jobs, 2026-12-04, demo/export already made): held-out accuracy 0.0%
# before (the composed model answers Python, "#"; a uniform guess among each kind's answers would score 27.8%),
# 53.3% after (colour 76%, count 45%, shape 39%; 240 questions about 80 unseen scenes), 4m56s end to end (289 s to the
# figures). The goal, 80%, is NOT reached yet. Rerun on a fresh machine with nothing else running (2026-12-04, the
# base pretrained by this script first): 52.1% after (colour 79%, count 39%, shape 39%), 528 s end to end; the
# OpenAI-client step asked "What colour is the triangle?" of a held-out scene and got 'yellow' (right: green).
#
# Why this path: the tower is random and stays frozen (vision.train_tower false), its patch one cell of the scene's
# 2x2 grid, so each object is one image token whose random features the projector learns to read (a linear probe
# tells the shapes apart from them 96% of the time). Tried on the way (docs/vision.md has the table): 8 px patches
# with the tower trained (lr 2e-3 cosine, 200 steps) 44.6%; 16 px patches with the tower trained (3e-3) or frozen at
# 5e-3, 31.2% (chance: the projector's output grew 80x and every image got the same answer); frozen at 1e-3 for 400
# steps 48.3%; a 1-layer tower of width 256, 51.7%; lr 2e-3 for 1500 steps, 48.3%. The language model learns the
# answer words in ~80 steps and then only slowly learns to read them from the image (a plain PyTorch loop shows the
# same plateau). Stage 1 barely moves (caption loss 6.6 -> 6.3): the language model, pretrained on Python, cannot say
# the captions' words while it is frozen; it is kept as LLaVA's recipe, not for the figures.
#
# Extra arguments are overrides of stage 2's recipe; SCENES, STAGE1_STEPS, STAGE2_STEPS change the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
. jobs/_demo_steps.sh
START=$(date +%s)
V=demo/vision
STAMP=$(date +%Y%m%d-%H%M%S)
demo_base
echo "== scenes, captions and questions; a vision tower; the composed model"
rm -rf "$V"
python jobs/vision_task.py data "$V/data" --seed 0 --train "${SCENES:-1200}" --held-out 80
python jobs/vision_task.py tower "$V/tower"
llmray vision compose --vision "$V/tower" --language-model demo/export --out "$V/composed"
python jobs/vision_task.py accuracy "$V/composed" "$V/data/held_out.yaml" --out "$V/accuracy_before.json"

echo "== stage 1: the projector alone, on captions"
llmray finetune jobs/vision_tiny.yaml "run.name=vision-stage1-$STAMP" "model.pretrained=$V/composed" \
  "data.conversations=$V/data/captions" vision.train_language_model=false data.val_fraction=0 data.seq_len=40 \
  train.max_steps="${STAGE1_STEPS:-40}" train.lr=1e-2
llmray export "runs/vision-stage1-$STAMP" --out "$V/stage1"

echo "== stage 2: the projector and the language model, on the questions (the tower frozen)"
llmray finetune jobs/vision_tiny.yaml "run.name=vision-stage2-$STAMP" "model.pretrained=$V/stage1" \
  "data.conversations=$V/data/instructions" data.val_fraction=0 data.seq_len=40 train.max_steps="${STAGE2_STEPS:-1000}" \
  train.lr=1e-3 train.warmup_steps=10 train.schedule=constant train.log_every=50 "$@"
llmray export "runs/vision-stage2-$STAMP" --out "$V/stage2"

echo "== after: held-out questions"
# `llmray eval "$V/stage2" --task "$V/data/held_out.yaml"` gives the same accuracy; this adds the per-kind split
python jobs/vision_task.py accuracy "$V/stage2" "$V/data/held_out.yaml" --out "$V/accuracy_after.json"
python - "$V" <<'EOF'
import json, sys
before, after = (json.load(open(f"{sys.argv[1]}/accuracy_{w}.json"))["tasks"]["shapes"] for w in ("before", "after"))
kinds = ", ".join(f"{k} {v:.0%}" for k, v in after["by_kind"].items())
print(f"held-out accuracy: {before['accuracy']:.1%} before, {after['accuracy']:.1%} after ({kinds}); a uniform "
      f"guess among each kind's answers: {after['chance']:.1%}")
EOF
echo "== $(( $(date +%s) - START )) s to here (the figures in the header)"

# One held-out question through the official OpenAI client (the image a data: URI)
echo "== one question about an image through the OpenAI chat endpoint"
PORT="${PORT:-8013}"
llmray serve "$V/stage2" --name vision --port "$PORT" > "$V/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break; sleep 1; done
python jobs/vision_task.py ask "http://127.0.0.1:$PORT/v1" vision "$V/data/held_out.jsonl" --line 0
