"""Checkpoint cost and recovery time.

1. Save / restore (2 ranks under torchrun, gloo on CPU or NCCL on GPU): for ZeRO-2 and ZeRO-3 on the tiny recipe
   model and on a ~100M-parameter Llama, the seconds `llmray.train.checkpoint.save` takes (DeepSpeed states, RNG,
   completion markers), the checkpoint's bytes, the seconds to load it back into a fresh engine of the same world
   size, and the seconds `ds_to_universal` takes to re-partition it for another world size.
2. Recovery (Ray Train): a real SIGKILL of one training worker of the tiny recipe after its first checkpoint;
   the seconds from the kill to the checkpoint being loaded again, and to the first step trained after it.

    python benchmarks/checkpoint.py [--sizes tiny,100m] [--stages 2,3] [--skip-recovery]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import emit, stdlib_corpus

RECIPE = str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain_tiny.yaml")
SIZES = {
    "tiny": [],  # the recipe's own model: hidden 128, 4 layers
    "100m": ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.intermediate_size=2048"],
}


def dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def save_restore_worker(overrides: list[str], out: str) -> None:
    """One torchrun rank: one optimizer step (so Adam states exist), save, load into a fresh engine, convert."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from llmray.data.tokenizer import load_tokenizer
    from llmray.model.build import build_model
    from llmray.model.flops import count_params
    from llmray.recipe.load import load_recipe
    from llmray.train import checkpoint
    from llmray.train.schedule import make_scheduler
    from llmray.train.zero import deepspeed_config, resolve_precision

    recipe = load_recipe(RECIPE, overrides)
    use_gpu = recipe.scaling.use_gpu
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank) if use_gpu else torch.device("cpu")
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    ds_config = deepspeed_config(recipe, resolve_precision(recipe, use_gpu))

    def engine():
        torch.manual_seed(0)
        model = build_model(recipe.model, len(tokenizer))
        n = count_params(model)  # before ZeRO-3 partitions the parameters away
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                       lr_scheduler=make_scheduler(recipe.train))
        return eng, n

    eng, n_params = engine()
    ids = torch.randint(0, len(tokenizer), (recipe.train.micro_batch_size, recipe.data.seq_len), device=device)
    for _ in range(recipe.grad_accum_steps):
        eng.backward(eng(input_ids=ids, labels=ids).loss)
        eng.step()
    folder = tempfile.mkdtemp(prefix="llmray-bench-ckpt-") if rank == 0 else None
    shared = [folder]
    dist.broadcast_object_list(shared)
    folder = shared[0]
    dist.barrier()
    t0 = time.perf_counter()
    checkpoint.save(eng, folder, {"step": 1, "tokens": 0, "history": [], "world_size": dist.get_world_size(),
                                  "recipe": recipe.model_dump(mode="json"), "vocab_size": len(tokenizer)},
                    rank, tokenizer)
    dist.barrier()
    save_s = time.perf_counter() - t0
    del eng
    fresh, _ = engine()
    dist.barrier()
    t0 = time.perf_counter()
    checkpoint.load(fresh, folder, universal=False)
    dist.barrier()
    load_s = time.perf_counter() - t0
    if rank == 0:
        t0 = time.perf_counter()
        checkpoint.to_universal(folder)
        universal_s = time.perf_counter() - t0
        universal_bytes = dir_bytes(os.path.join(folder, checkpoint.UNIVERSAL_DIR))
        size = dir_bytes(folder) - universal_bytes
        Path(out).write_text(json.dumps({
            "parameters": n_params, "save_s": round(save_s, 3), "checkpoint_bytes": size,
            "save_MB_per_s": round(size / save_s / 1e6, 1), "restore_s": round(load_s, 3),
            "to_universal_s": round(universal_s, 3)}))
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()


def save_restore(shards: str, tok: str, size: str, stage: int, use_gpu: bool) -> dict:
    overrides = [f"data.shards={shards}", f"data.tokenizer={tok}", f"train.zero_stage={stage}", "scaling.num_workers=2",
                 "train.micro_batch_size=4", "train.global_batch_size=8", f"scaling.use_gpu={str(use_gpu).lower()}",
                 *SIZES[size]]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        env = {**os.environ, "DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", __file__, "--worker", out, *overrides],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        return {"model": size, "zero_stage": stage, **json.loads(Path(out).read_text())}


def recovery(shards: str, tok: str) -> dict:
    """Kill one Ray Train worker after the first checkpoint; time until the run has reloaded and stepped again."""
    import psutil
    import ray

    from llmray.recipe.load import load_recipe
    from llmray.train.checkpoint import list_checkpoints, read_state
    from llmray.train.trainer import fit

    killed_at: list[float] = []

    def killer(run_dir: str) -> None:
        while not list_checkpoints(run_dir):
            time.sleep(0.05)
        time.sleep(3)  # past Ray Train's registration of the checkpoint
        victim = next(p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or []))
        killed_at.append(time.time())
        os.kill(victim.pid, signal.SIGKILL)

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(RECIPE, [f"data.shards={shards}", f"data.tokenizer={tok}", f"run.storage_path={tmp}",
                                      "run.name=recovery", "train.max_steps=60", "train.checkpoint_every=10",
                                      "train.log_every=10", "train.sample_prompt=null", "scaling.max_failures=1",
                                      "data.val_fraction=0", "train.eval_every=0"])
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        thread = threading.Thread(target=killer, args=(os.path.join(tmp, "recovery"),), daemon=True)
        thread.start()
        summary = fit(recipe)
        ray.shutdown()
        resume = read_state(summary.checkpoint).resumes[0]
    return {"resumed_from_step": resume["step"], "kill_to_checkpoint_loaded_s": round(resume["loaded_at"] - killed_at[0], 2),
            "kill_to_first_step_s": round(resume["first_step_at"] - killed_at[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,100m")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--gpu", action="store_true", help="2 GPUs, NCCL, bf16")
    p.add_argument("--skip-recovery", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        save_restore_worker(args.overrides, args.worker)
        return
    shards, tok = stdlib_corpus()
    rows = []
    for size in args.sizes.split(","):
        for stage in map(int, args.stages.split(",")):
            rows.append(save_restore(shards, tok, size, stage, args.gpu))
            print(json.dumps(rows[-1]), flush=True)
    figures = {"device": "gpu" if args.gpu else f"cpu x{os.cpu_count()}", "ranks": 2, "save_restore": rows}
    if not args.skip_recovery:
        figures["recovery"] = recovery(shards, tok)
    emit("checkpoint" + ("_gpu" if args.gpu else ""), figures)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
