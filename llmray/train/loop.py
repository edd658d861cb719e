"""The worker-side training loop, plain Python: DeepSpeed engine, micro-batches in, metrics and checkpoints out.

Ray Train launches it through `ray_entry.train_loop_per_worker`; `benchmarks/train_overhead.py` drives the same
function under torchrun with in-memory data, so the two paths differ only in how batches and reports travel.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Iterator, Protocol

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from llmray.config import Recipe
from llmray.data.tokenizer import load_tokenizer
from llmray.model import build_model, count_params, flops_per_token, peak_flops
from llmray.train import checkpoint
from llmray.train.metrics import Window, progress_line
from llmray.train.schedule import make_scheduler
from llmray.train.zero import deepspeed_config, resolve_precision


class Sink(Protocol):
    """Where metrics and checkpoints go: `ray.train.report` under Ray, a list and a folder without it."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None: ...


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _mean_across_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(backend_device)
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.cpu().tolist()


@torch.no_grad()
def evaluate(engine, samples: np.ndarray, micro_batch: int, device: torch.device) -> dict:
    """Mean loss and perplexity over this rank's equal slice of the fixed validation samples."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = len(samples) // world  # equal counts: ZeRO-3 forwards are collectives
    mine = samples[rank * per_rank:(rank + 1) * per_rank]
    engine.eval()
    total = 0.0
    batches = 0
    for start in range(0, per_rank, micro_batch):
        ids = torch.from_numpy(mine[start:start + micro_batch]).to(device, torch.long)
        total += engine(input_ids=ids, labels=ids).loss.float().item()
        batches += 1
    engine.train()
    (mean,) = _mean_across_ranks([total / max(batches, 1)])
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}


def _sample(engine, tokenizer, prompt: str, n_tokens: int, seed: int, zero3: bool, device) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False) or [tokenizer.eos_token_id]], device=device)
    torch.manual_seed(seed)
    engine.eval()
    with torch.no_grad():
        out = engine.module.generate(ids, max_new_tokens=n_tokens, do_sample=True, top_k=40, temperature=0.8,
                                     pad_token_id=tokenizer.eos_token_id, synced_gpus=zero3 and dist.get_world_size() > 1)
    engine.train()
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _gather_ids(batch: dict) -> list[list[int]]:
    """Every rank's (epoch, shard position, sample) ids of this micro-batch, in rank order."""
    mine = np.stack([batch["epoch"], batch["position"], batch["sample"]], axis=1).tolist()
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [row for part in out for row in part]


def train(recipe: Recipe, batches: Iterator[dict], val_samples: np.ndarray | None, sink: Sink,
          resume_dir: str | None = None, verbose: bool = True) -> dict:
    """Train until `train.max_steps` (or the stream ends); returns the last metrics reported.

    `resume_dir`: a local copy of a checkpoint; the stream in `batches` must already start at its cursor.
    """
    t, use_gpu = recipe.train, recipe.scaling.use_gpu
    device = _device(use_gpu)
    torch.manual_seed(recipe.run.seed)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    precision = resolve_precision(recipe, use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    ds_config = deepspeed_config(recipe, precision)
    rank, world = dist.get_rank(), dist.get_world_size()
    state = {"step": 0, "tokens": 0, "history": [], "cursor": None, "resumes": []}
    universal = False
    if resume_dir is not None:
        state = checkpoint.verify(resume_dir)
        universal = checkpoint.needs_universal(state, world, t.zero_stage)
        if universal:  # DeepSpeed must know at initialize() that its states come re-partitioned
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
    model = build_model(recipe.model, len(tokenizer))
    if recipe.quant.method == "qat":  # before DeepSpeed wraps and partitions the parameters
        from llmray.quant import prepare_qat

        n_fake = prepare_qat(model, recipe.quant)
        if verbose and rank == 0:
            print(f"[llmray] QAT: {n_fake} Linear layers fake-quantized as {recipe.quant.scheme}", flush=True)
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    n_params = count_params(model)
    fpt = flops_per_token(model.config, count_params(model, exclude_embeddings=True), recipe.data.seq_len)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else make_scheduler(t))

    if resume_dir is not None:
        checkpoint.load(engine, resume_dir, universal)
        same_world = state.get("world_size") == world
        if not (same_world and checkpoint.restore_rng(resume_dir, rank)):
            torch.manual_seed(recipe.run.seed + 1_000_003 * state["step"] + rank)  # new world size: fresh, seeded
        state.setdefault("resumes", []).append({"step": state["step"], "world_size": world,
                                                "from_world_size": state.get("world_size", world),
                                                "loaded_at": time.time()})
        if verbose and rank == 0:
            how = "" if same_world else f", re-partitioned from {state.get('world_size')} to {world} ranks"
            print(f"[llmray] resumed at step {state['step']}{how}; stream at {state.get('cursor')}", flush=True)
    step, tokens, history = state["step"], state["tokens"], state["history"]
    cursor, audit = state.get("cursor"), state.get("trace", [])

    peak = peak_flops(torch.cuda.get_device_name(device)) if use_gpu else None
    window = Window(recipe.tokens_per_step, world, fpt, peak)
    started, first_step = time.perf_counter(), step
    accum = recipe.grad_accum_steps
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    last: dict = {}

    def save_checkpoint(metrics: dict) -> None:
        tmp = checkpoint.scratch_dir()
        checkpoint.save(engine, tmp, {
            "step": step, "tokens": tokens, "history": history, "cursor": cursor, "trace": audit,
            "resumes": state.get("resumes", []), "world_size": world, "n_params": n_params,
            "vocab_size": len(tokenizer), "recipe": recipe.model_dump(mode="json"),
        }, rank, tokenizer)
        sink.report(metrics, checkpoint_dir=tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    def report(final: bool) -> None:
        nonlocal loss_sum, last, window_steps
        if use_gpu:
            torch.cuda.synchronize()
        m = window.close()
        loss, wait_share = _mean_across_ranks([loss_sum.item() / max(window_steps, 1) / accum, m["data_wait_share"]])
        if window_steps == 0:  # nothing trained since the last report (resumed at the end, or stream ended)
            loss = history[-1]["loss"] if history else float("nan")
        m.update(step=step, tokens=tokens, loss=loss, data_wait_share=wait_share, lr=engine.get_lr()[0])
        gnorm = engine.get_global_grad_norm()
        m["grad_norm"] = float(gnorm) if gnorm is not None else None
        if (final or (t.eval_every and step % t.eval_every == 0)) and val_samples is not None and len(val_samples) >= world:
            m.update(evaluate(engine, val_samples, t.micro_batch_size, device))
        loss_sum, window_steps = torch.zeros_like(loss_sum), 0
        history.append({k: v for k, v in m.items() if isinstance(v, (int, float))})
        if verbose and rank == 0:
            print(progress_line(m, t.max_steps, started, first_step), flush=True)
        if final and t.sample_prompt is not None:
            m["sample"] = _sample(engine, tokenizer, t.sample_prompt, t.sample_tokens, recipe.run.seed,
                                  t.zero_stage == 3, device)
        if final or (t.checkpoint_every and step % t.checkpoint_every == 0):
            save_checkpoint(m)
        else:
            sink.report(m)
        last = m

    window_steps = 0
    engine.train()
    while step < t.max_steps:
        step_loss = torch.zeros((), device=device, dtype=torch.float32)
        step_samples = []
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(batches, None)
            window.data_wait += time.perf_counter() - t0
            if batch is None:
                break
            ids = torch.from_numpy(np.array(batch["input_ids"], dtype=np.int64)).to(device, non_blocking=True)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float()
            if t.record_samples:
                step_samples += _gather_ids(batch)
        if batch is None:  # the stream ended (max_epochs): a partial accumulation is dropped
            if verbose and rank == 0:
                print(f"[llmray] data stream ended after {step} steps", flush=True)
            break
        step += 1
        if step == first_step + 1 and state.get("resumes"):
            state["resumes"][-1]["first_step_at"] = time.time()  # recovery time, for benchmarks/checkpoint.py
        tokens += recipe.tokens_per_step
        cursor = vars(batch["cursor"]) if "cursor" in batch else None  # the stream position after this step
        if t.record_samples:
            (mean_loss,) = _mean_across_ranks([step_loss.item() / accum])
            audit.append({"step": step, "loss": mean_loss, "samples": step_samples})
        window.steps += 1
        window_steps += 1
        loss_sum += step_loss
        if step % t.log_every == 0 or step == t.max_steps:
            report(final=step == t.max_steps)
    if step < t.max_steps or step == first_step:  # stream ended early, or resumed a finished run
        report(final=True)
    return last
