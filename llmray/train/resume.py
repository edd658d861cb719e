"""Resuming, in one place: where a run starts (before any worker), whether a checkpoint fits the recipe, and
restoring one into a new engine and stream (after), re-partitioning ZeRO shards when the world size changed.

    driver:  plan(recipe, ...)      the run's own latest checkpoint, or --resume-from, or a fresh start
    worker:  Restore(dir, ...)      read and verify; tells build_engine whether DeepSpeed loads a universal layout
             .apply(engine, stream) engine states, RNGs (same world size) or a seeded fresh draw, stream position
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from llmray.recipe.schema import Recipe
from llmray.train import checkpoint
from llmray.train.checkpoint import CheckpointError
from llmray.train.safe_load import weights_only_loads
from llmray.train.state import TrainState

# What must match for a checkpoint to be resumed: the model's shape and the stream's content and order.
RESUME_KEYS = ("model", "data.seq_len", "data.shards", "data.sources", "data.val_shards", "data.val_fraction",
               "data.conversations", "data.format", "data.split", "finetune", "distill", "preference",
               "prune", "run.seed", "train.zero_stage")
UNIVERSAL_DIR = "universal"


def _get(d: dict, dotted: str):
    for key in dotted.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def check_compatible(state: TrainState, recipe: dict, vocab_size: int, uri: str) -> None:
    """Refuse to resume a checkpoint whose model shape or data stream differs from the recipe's."""
    if state.stream and "sources" not in state.stream:
        raise CheckpointError(
            f"checkpoint {uri} was written by an llmray whose stream read shards one after another; its stream "
            "position does not apply to the mixing stream, so it cannot be resumed. It can still be exported "
            "(llmray export), and a new run can start from the export (model.pretrained)")
    diffs = [f"{k}: checkpoint {_get(state.recipe, k)!r}, recipe {_get(recipe, k)!r}" for k in RESUME_KEYS
             if _get(state.recipe, k) != _get(recipe, k)]
    if state.vocab_size not in (None, vocab_size):
        diffs.append(f"tokenizer vocabulary: checkpoint {state.vocab_size}, recipe {vocab_size}")
    if diffs:
        raise CheckpointError(f"checkpoint {uri} cannot be resumed with this recipe; it differs in "
                              + "; ".join(diffs))


def earlier_recipe(recipe: Recipe, resume_from: str | None) -> dict | None:
    """The recipe of the checkpoint this run would continue (`--resume-from`, else the run's latest), if any."""
    try:
        if resume_from:
            return checkpoint.read_state(resume_from).recipe
        existing = checkpoint.list_checkpoints(recipe.run.folder)
        return checkpoint.read_state(existing[-1][1]).recipe if existing else None
    except (CheckpointError, OSError):
        return None  # plan() names what is wrong with it


def plan(recipe: Recipe, vocab: int, resume_from: str | None, fresh: bool) -> tuple[str | None, dict]:
    """Decide, before any worker starts, where the run begins; returns the checkpoint given by `--resume-from`, and
    the stream position the run will start at (the stream begins tokenizing there while the workers start).

    A run whose folder already holds checkpoints continues from the latest (Ray Train restores it on its own);
    `fresh` refuses such a run rather than overwrite it.
    """
    existing = checkpoint.list_checkpoints(recipe.run.folder)
    wanted = recipe.model_dump(mode="json")
    if existing and (fresh or resume_from):
        step, _ = existing[-1]
        raise CheckpointError(
            f"run {recipe.run.name!r} already has {len(existing)} checkpoint(s) in {recipe.run.folder} (latest: step "
            f"{step}); {'--fresh' if fresh else '--resume-from'} never overwrites a run: choose another run.name, "
            "or remove that folder, or drop the flag to continue it")
    if resume_from:
        state = checkpoint.verify(resume_from)
        check_compatible(state, wanted, vocab, resume_from)
        print(f"[llmray] starting {recipe.run.name} from {resume_from} (step {state.step})", flush=True)
        return resume_from, state.stream
    if existing:
        step, latest = existing[-1]
        state = checkpoint.read_state(latest)
        check_compatible(state, wanted, vocab, latest)
        print(f"[llmray] continuing run {recipe.run.name} from its checkpoint at step {step} ({latest})", flush=True)
        return None, state.stream
    return None, {}


def needs_universal(state: TrainState, world_size: int, zero_stage: int) -> bool:
    """ZeRO 1-3 shards are cut for the world size that wrote them; another world size loads them re-partitioned."""
    return zero_stage > 0 and state.world_size != world_size


def to_universal(directory: str) -> str:
    """Convert the DeepSpeed states under `directory` into DeepSpeed's universal (world-size free) layout."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = os.path.join(directory, UNIVERSAL_DIR)
    args = argparse.Namespace(input_folder=os.path.join(directory, checkpoint.TAG),
                              output_folder=os.path.join(out, checkpoint.TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with weights_only_loads():
        ds_to_universal(args)
    Path(out, "latest").write_text(checkpoint.TAG)
    return out


def load_engine(engine, directory: str, universal: bool, strict: bool = True) -> None:
    """`strict` False: the module's state may carry keys the fresh module lacks (a 4-bit base's quantization
    state); the trained weights come back from the optimizer's fp32 partitions either way."""
    source = to_universal(directory) if universal else directory
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(source, tag=checkpoint.TAG, load_module_strict=strict)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no states to load in checkpoint {directory}")
    if universal:
        steps_beside_their_parameters(engine.optimizer)


def steps_beside_their_parameters(optimizer) -> None:
    """DeepSpeed's universal load puts each Adam `step` back as the CPU tensor it read, where torch's own
    load_state_dict would have moved it; fused AdamW needs it on its parameter's device."""
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 optimizers wrap a torch one
    for param, state in getattr(inner, "state", {}).items():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step) and step.device != param.device:
            state["step"] = step.to(param.device, torch.float32)


class Restore:
    """A verified local copy of a checkpoint, about to be loaded by a group of `world_size` ranks."""

    def __init__(self, directory: str, world_size: int, zero_stage: int):
        self.directory, self.world_size = directory, world_size
        self.saved = checkpoint.verify(directory)
        # DeepSpeed must know at initialize() that its states come re-partitioned
        self.universal = needs_universal(self.saved, world_size, zero_stage)

    def apply(self, engine, stream, now: TrainState, rank: int, seed: int) -> TrainState:
        """Load the engine's states, the RNGs and the stream position; returns the state to continue from (the
        saved one, with this group's world size and the facts of `now`)."""
        saved = self.saved
        # bitsandbytes saves a 4-bit weight's quantization state as extra keys beside it, which only its own
        # loader reads; the frozen base is quantized again from model.pretrained when the engine is built.
        four_bit_base = (saved.recipe.get("finetune") or {}).get("method") == "qlora"
        load_engine(engine, self.directory, self.universal, strict=not four_bit_base)
        if not (saved.world_size == self.world_size and checkpoint.restore_rng(self.directory, rank)):
            torch.manual_seed(seed + 1_000_003 * saved.step + rank)  # new world size: fresh, seeded
        stream.load_state_dict(saved.stream)
        resumes = [*saved.resumes, {"step": saved.step, "world_size": self.world_size,
                                    "from_world_size": saved.world_size, "loaded_at": time.time()}]
        return replace(saved, world_size=self.world_size, resumes=resumes, n_params=now.n_params,
                       vocab_size=now.vocab_size, recipe=now.recipe)

    def describe(self, state: TrainState) -> str:
        moved = state.resumes[-1]["from_world_size"]
        how = "" if moved == self.world_size else f", re-partitioned from {moved} to {self.world_size} ranks"
        return f"[llmray] resumed at step {state.step}{how}; stream at {state.stream or 'its start'}"
