#!/usr/bin/env bash
# A vision-language model from parts, on a laptop CPU: Pillow-drawn scenes of shapes (jobs/vision_task.py: "What
# colour is the square?", "What shape is blue?", "How many red circles?"), a random-init CLIP vision tower made from a
# config (nothing downloaded), the tiny language model jobs/demo.sh pretrained (demo/export; pretrained here only
# when jobs/demo.sh has not run), composed with a new projector by `llmray vision compose`, then LLaVA's two stages
# with `llmray finetune` (jobs/vision_tiny.yaml): stage 1 the projector alone on captions, stage 2 on the questions.
# Held-out accuracy (greedy answers, exact match) is printed before and after.
#
# FIGURES
#
# Extra arguments are overrides of stage 2's recipe.
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
  "data.conversations=$V/data/captions" vision.train_language_model=false data.val_fraction=0 \
  train.max_steps="${STAGE1_STEPS:-40}" train.lr=1e-2
llmray export "runs/vision-stage1-$STAMP" --out "$V/stage1"

echo "== stage 2: the tower, projector and language model, on the questions"
llmray finetune jobs/vision_tiny.yaml "run.name=vision-stage2-$STAMP" "model.pretrained=$V/stage1" \
  "data.conversations=$V/data/instructions" vision.train_tower=true data.val_fraction=0 \
  train.max_steps=200 train.lr=2e-3 train.warmup_steps=10 train.schedule=cosine "$@"
llmray export "runs/vision-stage2-$STAMP" --out "$V/stage2"

echo "== after: held-out questions"
# With image tasks in `llmray eval`: llmray eval "$V/stage2" --task "$V/data/held_out.yaml" --out "$V/accuracy_after.json"
python jobs/vision_task.py accuracy "$V/stage2" "$V/data/held_out.yaml" --out "$V/accuracy_after.json"
python - "$V" <<'EOF'
import json, sys
before, after = (json.load(open(f"{sys.argv[1]}/accuracy_{w}.json"))["tasks"]["shapes"] for w in ("before", "after"))
kinds = ", ".join(f"{k} {v:.0%}" for k, v in after["by_kind"].items())
print(f"held-out accuracy: {before['accuracy']:.1%} before, {after['accuracy']:.1%} after ({kinds})")
EOF
echo "== $(( $(date +%s) - START )) s end to end"
