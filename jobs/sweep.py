"""A hyperparameter sweep (W&B sweep format) of whole training runs, on the cluster the job runs on:

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py tune/lr_asha.yaml

Same arguments as `llmray tune`. Resubmitting an interrupted sweep resumes it (same name and storage path).
"""

import sys

from _entry import run

if __name__ == "__main__":
    run(["tune", *sys.argv[1:]])
