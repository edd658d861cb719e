"""Peak memory per rank under ZeRO-1, 2 and 3: a ~210M-parameter Llama trained a few steps through `fit` (Ray Train,
2 workers), each stage in a fresh process. On CPU the figure is each worker's peak resident set; on GPUs, GPU memory
allocated and host RSS. `--before DIR` also runs ZeRO-3 with another checkout of llmray (e.g. one from before
ZeRO-3 built its model partitioned), so the two constructions are compared on one machine.

    python benchmarks/zero_memory.py [--before DIR] [--steps 3] [--out FILE] [key=value recipe overrides...]

`--out FILE` also writes the stages measured so far after each one (a run stopped at a time limit keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import emit, stdlib_corpus

RECIPE = str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain_tiny.yaml")
MODEL = ["model.hidden_size=1024", "model.num_layers=12", "model.num_heads=16", "model.intermediate_size=4096",
         "data.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=4", "scaling.num_workers=2",
         "train.eval_every=0", "train.checkpoint_every=0", "train.sample_prompt=null", "data.val_fraction=0"]


def one(overrides: list[str], out: str) -> None:
    """A run in this process: its peaks and parameter count, to `out`."""
    import ray

    from llmray.recipe.load import load_recipe
    from llmray.train.checkpoint import read_state
    from llmray.train.trainer import fit

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(load_recipe(RECIPE, [*overrides, f"run.storage_path={tmp}", "run.name=zero_memory"]))
        state = read_state(summary.checkpoint)
    ray.shutdown()
    last = state.history[-1]
    Path(out).write_text(json.dumps({"n_params": state.n_params, "peak_memory_gb": last["peak_memory_gb"],
                                     "peak_host_memory_gb": last.get("peak_host_memory_gb"),
                                     "tokens_per_s": last["tokens_per_s"]}))


def run(overrides: list[str], code: str | None) -> dict:
    """`one` in a fresh interpreter, importing llmray from `code` when given."""
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "one.json")
        subprocess.run([sys.executable, __file__, "--one", out, *overrides], check=True, env=env,
                       cwd=code or os.getcwd())
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="another llmray checkout to run ZeRO-3 with, for comparison")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", help="also write the stages so far here, after each")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args.overrides, args.one)
        return
    shards, tok = stdlib_corpus()
    base = [f"data.shards={shards}", f"data.tokenizer={tok}", f"train.max_steps={args.steps}",
            f"train.log_every={args.steps}", *MODEL, *args.overrides]
    import torch

    on_gpu = "scaling.use_gpu=true" in args.overrides
    workers = next((int(o.split("=")[1]) for o in reversed([*MODEL, *args.overrides]) if o.startswith("scaling.num_workers=")))
    figures = {"device": torch.cuda.get_device_name(0) if on_gpu else f"cpu x{os.cpu_count()}", "workers": workers,
               "overrides": MODEL + args.overrides, "stages": {}}
    stages = figures["stages"]
    runs = [(f"zero{s}", [*base, f"train.zero_stage={s}"], None) for s in (1, 2, 3)]
    if args.before:
        runs.append(("zero3_before", [*base, "train.zero_stage=3"], os.path.abspath(args.before)))
    for name, overrides, code in runs:
        stages[name] = run(overrides, code)
        figures["n_params"] = stages["zero1"]["n_params"]
        figures["peak_ratio_vs_zero1"] = {k: round(v["peak_memory_gb"] / stages["zero1"]["peak_memory_gb"], 3)
                                          for k, v in stages.items()}
        if args.out:
            Path(args.out).write_text(json.dumps(figures, indent=1))
    if args.before:
        figures["before"] = args.before
    emit("zero_memory", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
