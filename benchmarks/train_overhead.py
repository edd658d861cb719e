"""Tokens/s of `llmray train` (Ray Data stream + Ray Train + DeepSpeed) against the same model, DeepSpeed config and
number of processes launched by torchrun without Ray, on data pre-tokenized in memory. Both run llmray's one
training loop (`llmray.train.loop.train`), so the difference is what Ray adds: data transport and orchestration.

    python benchmarks/train_overhead.py [--steps 60] [key=value recipe overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import emit, stdlib_corpus, steady

RECIPE = str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain_tiny.yaml")
BENCH = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "data.seq_len=256",
         "train.micro_batch_size=8", "train.global_batch_size=16", "train.log_every=10", "train.eval_every=0",
         "train.checkpoint_every=0", "train.sample_prompt=null", "data.val_fraction=0", "scaling.num_workers=2"]


def bare_worker(recipe_overrides: list[str], out: str) -> None:
    """One torchrun process: tokenize in memory, then the same loop with a list for a sink."""
    import deepspeed
    import numpy as np
    import torch.distributed as dist

    from llmray.data.pack import Packer, StreamSpec
    from llmray.data.split import Documents
    from llmray.recipe.load import load_recipe
    from llmray.train import loop

    recipe = load_recipe(RECIPE, recipe_overrides)
    deepspeed.init_distributed(dist_backend="nccl" if recipe.scaling.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    d, m = recipe.data, recipe.train.micro_batch_size
    spec = StreamSpec.of([("corpus", 1.0, Documents(d.shards))], d.tokenizer, d.seq_len, recipe.run.seed,
                         d.tokenize_batch_docs)
    packer = Packer(spec)
    need = recipe.train.max_steps * recipe.train.global_batch_size
    rows = []
    for block in range(spec.sources[0].n_blocks):  # the stream's first epoch, in its order
        rows.append(packer.block(0, 0, block)["input_ids"])
        if sum(len(r) for r in rows) >= need:
            break
    data = np.concatenate(rows)[:need]
    per_micro = world * m  # the stream's layout: rank r takes rows [r*m, (r+1)*m) of each global micro-batch
    batches = iter({"input_ids": data[j * per_micro + rank * m: j * per_micro + (rank + 1) * m]}
                   for j in range(len(data) // per_micro))

    class InMemoryStream:  # the loop's Stream: batches, and a position it never resumes from here
        def __next__(self):
            return next(batches)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    class ListSink:
        reports: list = []

        def report(self, metrics, checkpoint_dir=None):
            self.reports.append(metrics)

    dist.barrier()
    sink = ListSink()
    loop.train(recipe, InMemoryStream(), None, sink, verbose=rank == 0)
    if rank == 0:
        Path(out).write_text(json.dumps([{k: v for k, v in r.items() if isinstance(v, (int, float))}
                                         for r in sink.reports]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_worker:
        bare_worker(args.overrides, args.bare_worker)
        return
    shards, tok = stdlib_corpus()
    overrides = [f"data.shards={shards}", f"data.tokenizer={tok}", f"train.max_steps={args.steps}", *BENCH,
                 *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bare.json")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", __file__, "--bare-worker", out, *overrides],
                       check=True, env=env)
        bare_tps = steady(json.loads(Path(out).read_text()))["tokens_per_s"]

        import ray

        from llmray.recipe.load import load_recipe
        from llmray.train.checkpoint import read_state
        from llmray.train.trainer import fit

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        summary = fit(load_recipe(RECIPE, [*overrides, f"run.storage_path={tmp}/runs", "run.name=overhead"]))
        measured = steady(read_state(summary.checkpoint).history)
        ray_tps, wait = measured["tokens_per_s"], measured["data_wait_share"]
        ray.shutdown()
    emit("train_overhead", {
        "steps": args.steps, "workers": 2, "overrides": BENCH + args.overrides,
        "bare_torchrun_tokens_per_s": round(bare_tps), "ray_llmray_tokens_per_s": round(ray_tps),
        "ratio_ray_over_bare": round(ray_tps / bare_tps, 3), "ray_data_wait_share": round(wait, 4),
    })


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
