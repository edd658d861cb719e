"""A checkpoint (local or s3://) into a Hugging Face folder, as a job on the cluster:

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/export.py s3://bucket/runs/NAME/checkpoint_... --out s3://bucket/exports/NAME

Same arguments as `llmray export`. The job's driver runs on one node (the head by default), so a local --out
lands on that node's disk only; an --out URI (s3://, gs://) is what Serve replicas on any node can read
(serve/config.yaml takes s3:// model paths). `llmray export` writes it whole or not at all.
"""

import sys

from _entry import run

if __name__ == "__main__":
    run(["export", *sys.argv[1:]])
