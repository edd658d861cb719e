"""Fine-tune from a recipe on the cluster the job runs on:

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/finetune.py jobs/sft_tiny.yaml [key=value ...] [--resume-from CKPT | --fresh]

Same arguments as `llmray finetune`; the job joins the cluster through RAY_ADDRESS, which Ray sets for it.
"""

import sys

from _entry import run

if __name__ == "__main__":
    run(["finetune", *sys.argv[1:]])
