#!/usr/bin/env bash
# Fine-tune partly -> GRPO on the task's reward -> score -> serve, on a laptop CPU. Takes the tiny model jobs/demo.sh
# pretrained (pretraining it only when jobs/demo.sh has not run here), fine-tunes it only partly on the word-category
# task (jobs/sft_tiny.yaml, 40 steps; reused when jobs/preference_demo.sh made it), then trains it with GRPO
# (jobs/grpo_tiny.yaml: LoRA, 8 completions per training prompt generated on llmray's serving engine inside each
# worker, rewarded 1 for the right category), prints held-out accuracy before and after, and asks the GRPO model one
# question through the OpenAI chat endpoint. Extra arguments are overrides of the GRPO recipe.
#
# Measured (2 CPU cores, 2026-12-03, demo/export and demo/sft_partial already there, 2m18s end to end): held-out
# accuracy 64.9% after the partial fine-tune, 80.7% after 40 GRPO steps (+15.8 points; the issue's goal is +20);
# the sampled completions' reward 0.16 -> 0.23 (at temperature 1 most completions trail extra tokens after the
# category, which the exact-match reward does not credit). Asked about 'tiger' it says "colour". Other settings did
# worse: 80 steps +14.0; lr 5e-3 collapsed to no reward after 10 steps (0.0%); temperature 0.7 with a one-word format
# reward +3.5; lr 3e-3 with 32 prompts a step +3.5; top_p 0.9 +12.3; top_p 0.95 +15.8; loss grpo +15.8; temperature
# 0.7 +5.3; group 16 +10.5; lr 1e-3 for 80 steps +12.3; the first word rewarded (+0.5 for the whole) +8.8. Full
# fine-tuning learns the sampled reward faster (0.10 -> 0.53 at lr 1e-3) but reaches +17.5 at best (lr 5e-4 or 1e-3;
# 1e-4 +15.8; 60 steps +14.0; group 16 -19.3); rl.top_k 5 lifts the sampled reward 0.43 -> 0.68 but +0.0 held out
# (animals learned, colours lost to "animal"; 80 steps +7.0); a less-tuned start does worse (20 SFT steps, 28.1%:
# collapsed to 0.0%; 30 steps, 29.8%: -1.8); a KL to the base with top_k 5 (beta 0.04 or 0.2) +14.0, animals learned and
# colours lost again. What holds it: the held-out animals (9 of 57). "animal" is three
# tokens and at temperature 1 the partly tuned model trails junk after it ("animal\ufffd"), which exact match scores 0
# like a wrong category, so GRPO pushes the word down; every run ends with all nine animals wrong (48/57, +19.3, is
# the ceiling without them). See docs/rl.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
. jobs/_demo_steps.sh
demo_partial_model
STAMP=$(date +%Y%m%d-%H%M%S)
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
