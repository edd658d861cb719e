"""A full grid against the same space under ASHA: best validation perplexity reached, and tokens trained in all.

One fixed small task: a small Llama on the interpreter's standard library (2 workers, ZeRO-2, CPU), 5 learning
rates x 3 global batch sizes, each trial a whole `llmray tune` trial with the same token budget. The grid trains
every trial to the budget; ASHA (W&B's `early_terminate: hyperband`, eta 3, first rung at 1/9 of the budget) stops
the weak ones at its rungs. The values are listed out of order so ASHA's first trials are not the extremes of a
sorted list. Goal (issue 6): ASHA's best within 2 % of the grid's, for at most 40 % of its tokens.

    python benchmarks/sweep.py [--budget-tokens 196608] [--hidden 128] [--layers 2]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml
from common import CACHE, emit, stdlib_corpus

RECIPE = str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain_tiny.yaml")
LRS = [3e-3, 3e-4, 3e-2, 1e-3, 1e-2]
BATCHES = [32, 16, 64]


def sweep_file(root: Path, name: str, shards: str, tok: str, args, asha: bool) -> Path:
    raw = {
        "name": name, "project": "llmray-bench", "method": "grid",
        "metric": {"name": "val_ppl", "goal": "minimize"},
        "parameters": {"train.lr": {"values": LRS}, "train.global_batch_size": {"values": BATCHES}},
        "llmray": {
            "recipe": RECIPE, "budget": {"tokens": args.budget_tokens}, "workers": 2, "max_concurrent_trials": 1,
            "storage_path": str(root), "export_best": False,
            "overrides": [f"data.shards={shards}", f"data.tokenizer={tok}", "data.seq_len=128",
                          "data.val_fraction=0.02", f"model.hidden_size={args.hidden}",
                          f"model.num_layers={args.layers}", "train.micro_batch_size=8", "train.warmup_steps=5",
                          "train.log_every=4", "train.eval_batches=8", "train.checkpoint_every=0",
                          "train.sample_prompt=null", "train.zero_stage=2"],
        },
    }
    if asha:
        raw["early_terminate"] = {"type": "hyperband", "min_iter": args.budget_tokens // 9, "eta": 3}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def outcome(rows: list[dict], wall_s: float) -> dict:
    done = [r for r in rows if r["status"] != "failed" and r.get("val_ppl") is not None]
    best = min(done, key=lambda r: r["val_ppl"])
    return {"trials": len(rows), "failed": len(rows) - len(done),
            "stopped_early": sum(r["status"] == "stopped early" for r in rows),
            "best_val_ppl": best["val_ppl"], "best": {k: best[k] for k in ("train.lr", "train.global_batch_size")},
            "tokens_trained": sum(r.get("tokens") or 0 for r in rows), "wall_s": wall_s,
            "per_trial": [{k: r.get(k) for k in ("train.lr", "train.global_batch_size", "status", "tokens", "val_ppl")}
                          for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-tokens", type=int, default=196_608, help="tokens per trial (96 steps at batch 16)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()

    import json
    import os

    os.environ.setdefault("WANDB_MODE", "offline")
    from llmray.sweep.run import run_sweep
    from llmray.sweep.spec import load_sweep

    shards, tok = stdlib_corpus()
    root = CACHE / "sweep"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    results = {}
    for name, asha in (("grid", False), ("asha", True)):
        started = time.time()
        out = run_sweep(load_sweep(sweep_file(root, name, shards, tok, args, asha)))
        results[name] = outcome(json.loads(Path(out["json"]).read_text()), time.time() - started)
    grid, asha = results["grid"], results["asha"]
    figures = {
        "task": {"corpus": "python stdlib", "hidden": args.hidden, "layers": args.layers, "seq_len": 128,
                 "workers": 2, "budget_tokens_per_trial": args.budget_tokens, "lrs": LRS, "global_batch_sizes": BATCHES},
        "grid": grid, "asha": asha,
        "asha_best_over_grid_best": asha["best_val_ppl"] / grid["best_val_ppl"],
        "asha_tokens_over_grid_tokens": asha["tokens_trained"] / grid["tokens_trained"],
        "asha_wall_over_grid_wall": asha["wall_s"] / grid["wall_s"],
    }
    figures["goal_met"] = (figures["asha_best_over_grid_best"] <= 1.02
                           and figures["asha_tokens_over_grid_tokens"] <= 0.40)
    print(f"grid: best val ppl {grid['best_val_ppl']:.2f} ({grid['best']}), {grid['tokens_trained']:,} tokens, "
          f"{grid['wall_s']:.0f} s")
    print(f"ASHA: best val ppl {asha['best_val_ppl']:.2f} ({asha['best']}), {asha['tokens_trained']:,} tokens, "
          f"{asha['wall_s']:.0f} s, {asha['stopped_early']} of {asha['trials']} stopped early")
    print(f"ASHA/grid: best {figures['asha_best_over_grid_best']:.3f}, tokens "
          f"{figures['asha_tokens_over_grid_tokens']:.2f}, wall {figures['asha_wall_over_grid_wall']:.2f}; "
          f"goal (≤1.02, ≤0.40) {'met' if figures['goal_met'] else 'NOT met'}")
    emit("sweep", figures)


if __name__ == "__main__":
    main()
