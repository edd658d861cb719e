"""Pretrain from a recipe on the cluster the job runs on:

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py jobs/pretrain_large.yaml [key=value ...] [--resume-from CKPT | --fresh]

Same arguments as `llmray train`; the job joins the cluster through RAY_ADDRESS, which Ray sets for it.
"""

import sys

from _entry import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
