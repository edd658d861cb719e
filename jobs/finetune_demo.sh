#!/usr/bin/env bash
# Pretrain -> fine-tune -> score -> serve, on a laptop CPU. Takes the tiny model jobs/demo.sh pretrained (and pretrains
# it only when jobs/demo.sh has not run here), fine-tunes it with LoRA (jobs/sft_tiny.yaml) on a generated task whose
# answers a script checks (the category of a word), prints exact-match accuracy on held-out prompts before and after,
# then asks the fine-tuned model one question through the OpenAI chat endpoint. Extra arguments are overrides of the
# fine-tuning recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
. jobs/_demo_steps.sh
demo_base_and_task
echo "== before fine-tuning: held-out prompts (tasks/word_category.yaml)"
llmray eval demo/export --task tasks/word_category.yaml --out demo/eval_before.json
RUN="sft-demo-$(date +%Y%m%d-%H%M%S)"
llmray finetune jobs/sft_tiny.yaml "run.name=$RUN" "$@"
llmray export "runs/$RUN" --out demo/sft --overwrite
echo "== after fine-tuning"
llmray eval demo/sft --task tasks/word_category.yaml --out demo/eval_after.json
ask_served demo/sft sft "${PORT:-8011}" mango
