"""Runs that more than one e2e module asserts on, made once per session: a Ray Train run costs tens of seconds before
its first step, whatever it then checks. Each module's tests assert their own things about the same runs."""

import pytest
from helpers import REPO, tiny


@pytest.fixture(scope="session")
def zero_runs(corpus, ray_cluster, tmp_path_factory):
    """The tiny recipe for 4 steps, same seed and global batch, three ways: 1 worker ZeRO-0; 2 workers ZeRO-2 with
    compiled decoder blocks and every other block's activations recomputed; 2 workers ZeRO-3 (built partitioned). The
    two 2-worker runs also run eval: tasks every 2 steps (split across the ranks under ZeRO-2, in step under ZeRO-3).

    test_train.py checks that the three give the same losses (so evaluating while training leaves training as it
    was); test_eval.py checks the figures evaluation reported against `llmray eval` on each exported checkpoint.
    {0: summary, 2: summary, 3: summary, "eval_tasks": [task files]}."""
    from llmray.train.trainer import fit

    tmp = tmp_path_factory.mktemp("zero")
    common = ["train.max_steps=4", "train.log_every=1", "train.checkpoint_every=0", "train.lr=1e-2"]
    tasks = [str(REPO / "tasks" / f) for f in ("stdlib_perplexity.yaml", "module_of.yaml", "stdlib_qa.yaml")]
    evals = [f"eval.tasks={tasks}", "eval.every=2"]
    return {
        "eval_tasks": tasks,
        0: fit(tiny(corpus, tmp, "run.name=z0", "scaling.num_workers=1", "train.zero_stage=0", *common)),
        2: fit(tiny(corpus, tmp, "run.name=z2", "scaling.num_workers=2", "train.zero_stage=2", *common, *evals,
                    "train.kernels.compile=true", "train.activation_checkpointing=2")),
        3: fit(tiny(corpus, tmp, "run.name=z3", "scaling.num_workers=2", "train.zero_stage=3", *common, *evals)),
    }

