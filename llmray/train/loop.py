"""The worker-side training loop, plain Python: a DeepSpeed engine, micro-batches in, metrics and checkpoints out.

Ray Train runs it through `worker.train_loop_per_worker`; `benchmarks/train_overhead.py` drives the same function
under torchrun with in-memory data, so the two paths differ only in how batches and reports travel.
"""

from __future__ import annotations

import shutil
import time
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from llmray import metric_names as M
from llmray.data.tokenizer import load_tokenizer
from llmray.evals.perplexity import perplexity, summed_nll
from llmray.model.flops import peak_flops
from llmray.objectives.objective import Objective, for_recipe
from llmray.ranks import across_ranks, gathered, max_across_ranks, mean_across_ranks
from llmray.recipe.schema import Recipe
from llmray.train import checkpoint
from llmray.train.batch import model_inputs
from llmray.train.deepspeed_engine import build_engine, device_for, partitioned_reference
from llmray.train.downstream import evaluate_tasks
from llmray.train.metrics import Window, progress_line
from llmray.train.resume import Restore
from llmray.train.state import TrainState


class Sink(Protocol):
    """Where metrics and checkpoints go: `ray.train.report` under Ray, a list and a folder without it."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None: ...


class Stream(Protocol):
    """This rank's micro-batches, and the stream's position (torchtitan's Stateful data loader)."""

    def __next__(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


Validation = list[tuple[str, float, dict]]  # per source: name, blend weight, fixed held-out rows (pack.first_rows)


def train(recipe: Recipe, stream: Stream, validation: Validation | None, sink: Sink, resume_dir: str | None = None,
          verbose: bool = True, tasks: list | None = None, generators=None) -> dict:
    """Train until `train.max_steps` (or the stream ends); returns the last metrics reported.

    `resume_dir`: a local copy of the checkpoint to continue from; the stream is moved to its position here.
    `tasks`: the recipe's eval tasks (loaded by the driver), run every `eval.every` steps and at the end.
    `generators`: an RL run's rollout actors and their update board (rl.rollout.placement separate); colocated,
    each rank makes its own.
    """
    t = recipe.train
    rank, world = dist.get_rank(), dist.get_world_size()
    talk = verbose and rank == 0
    device = device_for(recipe.scaling.use_gpu)
    torch.manual_seed(recipe.run.seed)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    if recipe.vision is not None:  # what a checkpoint keeps: its processor, the tokenizer within it
        from llmray.data.pixels import load_processor

        saved = load_processor(recipe.data.tokenizer)
    else:
        saved = tokenizer
    restore = Restore(resume_dir, world, t.zero_stage) if resume_dir is not None else None
    engine, facts = build_engine(recipe, len(tokenizer), device, restore is not None and restore.universal, talk)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    reference = partitioned_reference(recipe, device, talk)
    if recipe.rl is not None:
        from llmray.objectives.rl import RlSteps

        rl = objective = RlSteps(recipe, engine, device, tokenizer, dtype, reference, generators)
    else:
        rl, objective = None, for_recipe(recipe, device, dtype, reference)
    state = TrainState(world_size=world, n_params=facts.n_params, vocab_size=len(tokenizer),
                       recipe=recipe.model_dump(mode="json"))
    if restore is not None:
        state = restore.apply(engine, stream, state, rank, recipe.run.seed)
        if talk:
            print(restore.describe(state), flush=True)

    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    window = Window(recipe.tokens_per_step, world, facts.flops_per_token, peak)
    started, first_step = time.perf_counter(), state.step
    metrics: dict = {}
    engine.train()
    while True:
        trained = state.step < t.max_steps and (
            rl.step(engine, stream, state, window) if rl is not None
            else train_step(engine, stream, recipe, state, window, device, objective, facts.flat_rows,
                            facts.pixels_per_row))
        if trained:
            if state.step == first_step + 1 and state.resumes:
                state.resumes[-1]["first_step_at"] = time.time()  # recovery time, for benchmarks/checkpoint.py
        elif state.step < t.max_steps and talk:  # a partial accumulation is dropped
            print(f"[llmray] data stream ended after {state.step} steps", flush=True)
        final = not trained or state.step == t.max_steps
        if not final and state.step % t.log_every:
            continue

        # ---- the end of a reporting step: metrics, evaluation, sample, checkpoint, report ----
        if device.type == "cuda":
            torch.cuda.synchronize()
        empty = window.steps == 0  # nothing trained since the last report (resumed at the end, or stream ended)
        own_loss, own_parts = window.loss, window.parts()
        metrics = window.close()
        loss, metrics[M.DATA_WAIT_SHARE], *parts = mean_across_ranks(
            [own_loss, metrics[M.DATA_WAIT_SHARE], *own_parts.values()])
        metrics.update(zip(own_parts, parts))
        metrics[M.PEAK_MEMORY_GB] = max_across_ranks(peak_memory_gb(device))
        if device.type == "cuda":
            metrics[M.PEAK_HOST_MEMORY_GB] = max_across_ranks(peak_host_memory_gb())
        if empty:
            loss = state.history[-1][M.LOSS] if state.history else float("nan")
        gnorm = engine.get_global_grad_norm()
        metrics.update({M.STEP: state.step, M.TOKENS: state.tokens, M.LOSS: loss, M.LR: engine.get_lr()[0],
                        M.GRAD_NORM: float(gnorm) if gnorm is not None else None})
        if (final or (t.eval_every and state.step % t.eval_every == 0)) and validation:
            metrics.update(validate(engine, validation, t.micro_batch_size, device, facts.flat_rows, objective,
                                    facts.pixels_per_row))
        if tasks and (final or (recipe.eval.every and state.step % recipe.eval.every == 0)):
            metrics.update(evaluate_tasks(engine, tokenizer, tasks, device, t.zero_stage == 3,
                                          saved if recipe.vision is not None else None))
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if talk:
            print(progress_line(metrics, t.max_steps, started, first_step), flush=True)
        if final and t.sample_prompt is not None:
            metrics[M.SAMPLE] = generate_sample(engine, tokenizer, t.sample_prompt, t.sample_tokens, recipe.run.seed,
                                                t.zero_stage == 3, device)
        if final or (t.checkpoint_every and state.step % t.checkpoint_every == 0):
            save_and_report(sink, metrics, engine, state, rank, saved)
        else:
            sink.report(metrics)
        if final:
            return metrics


def train_step(engine, stream: Iterator[dict], recipe: Recipe, state: TrainState, window: Window,
               device: torch.device, objective: Objective, flat: bool = False, pixels_per_row: bool = False) -> bool:
    """One optimizer step over `grad_accum_steps` micro-batches of the objective's loss; False when the stream
    ended first. `flat`, `pixels_per_row`: see `batch.model_inputs`."""
    accum = recipe.grad_accum_steps
    step_loss = torch.zeros((), device=device, dtype=torch.float32)
    parts = {name: torch.zeros_like(step_loss) for name in objective.parts}
    samples: list = []
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = next(stream, None)
        window.data_wait += time.perf_counter() - t0
        if batch is None:
            return False
        loss, got = objective.loss(engine, model_inputs(batch, device, flat=flat, sequences=True,
                                                        pixels_per_row=pixels_per_row))
        for name, value in got.items():
            parts[name] += value
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        step_loss += loss.detach().float()
        if recipe.train.record_samples:
            samples += gather_ids(batch)
    state.step += 1
    state.tokens += recipe.tokens_per_step
    state.stream = stream.state_dict()  # the position after this step: where a checkpoint of it resumes
    if recipe.train.record_samples:
        (mean_loss,) = mean_across_ranks([step_loss.item() / accum])
        state.trace.append({"step": state.step, "loss": mean_loss, "samples": samples})
    window.add_step(step_loss / accum, {k: v / accum for k, v in parts.items()})
    return True


def save_and_report(sink: Sink, metrics: dict, engine, state: TrainState, rank: int, tokenizer) -> None:
    """Each rank writes its part into its own folder; the sink (Ray Train) merges them into one checkpoint.
    `tokenizer`: what export needs beside the weights (a vision-language model's processor)."""
    tmp = checkpoint.scratch_dir()
    checkpoint.save(tmp, rank, engine, state, tokenizer)
    sink.report(metrics, checkpoint_dir=tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak so far: GPU memory allocated on a GPU; on CPU its resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_host_memory_gb()


def peak_host_memory_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB


@torch.no_grad()
def validate(engine, validation: Validation, micro_batch_size: int, device: torch.device, flat: bool = False,
             objective: Objective | None = None, pixels_per_row: bool = False) -> dict:
    """Mean loss and perplexity on each source's fixed validation samples (each rank an equal slice; each source's
    loss token-weighted over all ranks), and overall: the sources' losses averaged with their blend weights. A
    single source reports only the overall figures. On held-out preference pairs, also the objective's reported
    parts (rewards/accuracies, ...) as `val_` metrics, averaged over the micro-batches of every rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    engine.eval()
    pairs = objective is not None and bool(objective.parts) and "sequence_ids" in validation[0][2]
    part_sums, batches = [0.0] * len(objective.parts if pairs else ()), 0
    sums = []  # per source: summed loss, tokens
    for _, _, rows in validation:
        per_rank = len(rows["input_ids"]) // world  # equal counts: ZeRO-3 forwards are collectives
        first = rank * per_rank
        total, count = 0.0, 0
        for start in range(first, first + per_rank, micro_batch_size):
            inputs = model_inputs(rows, device, slice(start, min(start + micro_batch_size, first + per_rank)), flat,
                                  sequences=pairs, pixels_per_row=pixels_per_row)
            for_objective = {k: inputs.pop(k) for k in ("sequence_ids", "reference_logps") if k in inputs}
            nll, n = summed_nll(engine, inputs)
            total, count = total + nll, count + n
            if for_objective:
                with torch.no_grad():
                    _, got = objective.loss(engine, {**inputs, **for_objective})
                part_sums = [a + float(got[name]) for a, name in zip(part_sums, objective.parts)]
                batches += 1
        sums += [total, count]
    engine.train()
    sums = across_ranks(sums)
    means = [total / max(count, 1) for total, count in zip(sums[::2], sums[1::2])]
    weights = np.array([w for _, w, _ in validation])
    overall = float(np.dot(weights / weights.sum(), means))
    out = {M.VAL_LOSS: overall, M.VAL_PPL: perplexity(overall)}
    if pairs:
        *part_sums, batches = across_ranks([*part_sums, batches])
        out.update({M.validation(name): total / max(batches, 1) for name, total in zip(objective.parts, part_sums)})
    if len(validation) > 1:
        for (name, _, _), mean in zip(validation, means):
            out[M.per_source(M.VAL_LOSS, name)] = mean
            out[M.per_source(M.VAL_PPL, name)] = perplexity(mean)
    return out


def generate_sample(engine, tokenizer, prompt: str, n_tokens: int, seed: int, zero3: bool, device) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False) or [tokenizer.eos_token_id]], device=device)
    torch.manual_seed(seed)
    engine.eval()
    with torch.no_grad():
        out = engine.module.generate(ids, max_new_tokens=n_tokens, do_sample=True, top_k=40, temperature=0.8,
                                     pad_token_id=tokenizer.eos_token_id, synced_gpus=zero3 and dist.get_world_size() > 1)
    engine.train()
    return tokenizer.decode(out[0], skip_special_tokens=True)


def gather_ids(batch: dict) -> list[list[int]]:
    """Every rank's (epoch, piece, sample) ids of this micro-batch, in rank order."""
    return gathered(np.stack([batch["epoch"], batch["piece"], batch["sample"]], axis=1).tolist())
