"""MFU of llmray's training step on one GPU: a ~1B Llama (hidden 2048, 16 layers, GQA 16/8 heads, vocab 32k, seq
2048), each kernel option on and off (an ablation), ZeRO-1/2/3, and the same settings under Ray Train with the real
stream against torchrun without Ray (the ratio is what Ray costs).

    python benchmarks/gpu_mfu.py [--steps 30] [--only NAME ...] [key=value recipe overrides...]
    python benchmarks/gpu_mfu.py --preset tiny   # a CPU rehearsal of every run (figures not kept)
    python benchmarks/gpu_mfu.py --only auto_zero1 --steps 20 --out mfu.json   # a GPU session's first item

`--out FILE` also writes the figures so far after each run, so a run stopped at its time limit keeps what it had.

Each run is llmray's one training loop (`llmray.train.loop.train`); torchrun feeds it pre-tokenized rows in memory
(`train_overhead.bare_worker`), Ray Train its Ray Data stream. Tokens/s, MFU and step time are the mean of the
report windows after the first (compilation and warm-up); peak GPU and host memory are the largest of any rank's.
Results go to benchmarks/results/gpu_mfu.json with the device, the versions and each run's resolved kernels.
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
from train_overhead import RECIPE, bare_worker

PRESETS = {
    # ~1.1B parameters: 16 x (4·2048² + 2·2048·1024 + 3·2048·8192) + 2·32000·2048
    "1b": ["model.hidden_size=2048", "model.num_layers=16", "model.num_heads=16", "model.num_kv_heads=8",
           "model.intermediate_size=8192", "model.max_position_embeddings=2048", "model.extra.vocab_size=32000",
           "data.seq_len=2048", "train.micro_batch_size=8", "train.global_batch_size=16", "scaling.use_gpu=true"],
    "tiny": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "data.seq_len=64",
             "train.micro_batch_size=4", "train.global_batch_size=8", "scaling.use_gpu=false"],
}
COMMON = ["scaling.num_workers=1", "train.eval_every=0", "train.checkpoint_every=0", "train.sample_prompt=null",
          "data.val_fraction=0", "train.warmup_steps=5"]
OFF = ["train.kernels.attention=sdpa", "train.kernels.compile=false", "train.kernels.liger=false",
       "train.kernels.adam=torch", "train.zero_stage=1"]

# name: overrides on top of the preset. The ablation starts from every option off and turns one on at a time; "auto"
# is what a recipe gets by default on a GPU; the ZeRO runs and the Ray run use the defaults.
RUNS = {
    "all_off": OFF,
    "fused_adam": [*OFF, "train.kernels.adam=torch_fused"],
    "flash_attention": [*OFF, "train.kernels.attention=auto"],
    "liger": [*OFF, "train.kernels.liger=auto"],
    "compile": [*OFF, "train.kernels.compile=true"],
    "auto_zero1": ["train.zero_stage=1"],
    "auto_zero2": ["train.zero_stage=2"],
    "auto_zero3": ["train.zero_stage=3"],
    "auto_zero1_recompute_half_mb16": ["train.zero_stage=1", "train.activation_checkpointing=2",
                                       "train.micro_batch_size=16", "train.global_batch_size=16"],
    # checks no CPU test can run: liger's loss under ZeRO-3 (its LM head gathered), DeepSpeed's JIT-built FusedAdam
    "liger_zero3": [*OFF, "train.kernels.liger=true", "train.zero_stage=3"],
    "sdpa_zero3": [*OFF, "train.zero_stage=3"],  # liger_zero3's loss without liger
    "deepspeed_fused_adam": [*OFF, "train.kernels.adam=deepspeed_fused"],
}
RAY_RUN = "auto_zero1"  # the settings measured under Ray Train too


def torchrun(overrides: list[str], out: str, env: dict) -> dict:
    # torchrun as this interpreter's module: the image's `torchrun` script may not be on PATH
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
                    "--bare-worker", out, *overrides], check=True, env=env)
    return steady(json.loads(Path(out).read_text()))


def under_ray(overrides: list[str], tmp: str) -> dict:
    import ray

    from llmray.recipe.load import load_recipe
    from llmray.train.checkpoint import read_state
    from llmray.train.trainer import fit

    ray.init(address="local", include_dashboard=False)
    try:
        summary = fit(load_recipe(RECIPE, [*overrides, f"run.storage_path={tmp}/runs", "run.name=gpu_mfu"]))
        return steady(read_state(summary.checkpoint).history)
    finally:
        ray.shutdown()


def versions() -> dict:
    import deepspeed
    import ray
    import torch
    import transformers

    from llmray.train.kernels import LIBRARIES, installed

    out = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "ray": ray.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda}
    for package, _ in LIBRARIES.values():
        out[package] = "installed" if installed(package) else "absent"
    return out


def kernels_of(overrides: list[str], on_gpu: bool) -> str:
    from llmray.recipe.load import load_recipe
    from llmray.train.kernels import resolve

    return resolve(load_recipe(RECIPE, overrides), on_gpu, "bf16" if on_gpu else "fp32").describe()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these runs only (default: all)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train run")
    p.add_argument("--out", help="also write the figures here, after each run")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_worker:
        bare_worker(args.overrides, args.bare_worker)
        return

    import torch

    on_gpu = args.preset != "tiny"
    if on_gpu and not torch.cuda.is_available():
        sys.exit("gpu_mfu: no CUDA device here; `--preset tiny` rehearses the runs on CPU")
    shards, tok = stdlib_corpus()
    base = [f"data.shards={shards}", f"data.tokenizer={tok}", f"train.max_steps={args.steps}",
            f"train.log_every={max(args.steps // 3, 1)}", *COMMON, *PRESETS[args.preset]]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not on_gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    runs, results = args.only or list(RUNS), {}

    def figures() -> dict:
        out = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu (rehearsal)", "preset": args.preset,
               "steps": args.steps, "versions": versions(), "runs": results}
        if "all_off" in results:  # which change bought how much
            off = results["all_off"]["torchrun"]["tokens_per_s"]
            out["speedup_over_all_off"] = {n: round(r["torchrun"]["tokens_per_s"] / off, 3) for n, r in results.items()}
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        for name in runs:
            overrides = [*base, *RUNS[name], *args.overrides]
            results[name] = {"kernels": kernels_of(overrides, on_gpu), "overrides": RUNS[name],
                             "torchrun": torchrun(overrides, os.path.join(tmp, f"{name}.json"), env)}
            print(f"[gpu_mfu] {name}: {json.dumps(results[name]['torchrun'])}", flush=True)
            figures()
        if not args.no_ray and RAY_RUN in results:
            os.environ.update(env)
            ray_run = under_ray([*base, *RUNS[RAY_RUN], *args.overrides], tmp)
            results[RAY_RUN]["ray_train"] = ray_run
            results[RAY_RUN]["ray_over_torchrun"] = round(
                ray_run["tokens_per_s"] / results[RAY_RUN]["torchrun"]["tokens_per_s"], 3)
            print(f"[gpu_mfu] {RAY_RUN} under Ray Train: {json.dumps(ray_run)}", flush=True)
    final = figures()
    if on_gpu:
        emit("gpu_mfu", final)
    else:
        print(json.dumps(final, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
