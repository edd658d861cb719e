"""Checkpoint contents and their checks.

A checkpoint folder holds:
  state/                 DeepSpeed's engine states, each rank writing its own ZeRO shards (universal-ready)
  rng/rank-R.json        each rank's Python, NumPy and torch RNG states
  tokenizer/             the tokenizer, so the checkpoint alone can be exported or served
  llmray_state.json      rank 0: step, tokens, metric history, stream cursor, world size, recipe
  done/rank-R.json       written last by each rank: the files it wrote and their sizes

A checkpoint counts as complete only when every rank's `done` marker is there and every file it lists has its
size; anything less (a crash mid-upload, a truncated copy) is reported as incomplete and never resumed from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from llmray.data import storage
from llmray.errors import LlmrayError
from llmray.train.safe_load import weights_only_loads

TAG = "state"  # DeepSpeed sub-folder; fixed so a checkpoint's layout never depends on the step
STATE_FILE = "llmray_state.json"
DONE_DIR = "done"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
UNIVERSAL_DIR = "universal"

# What must match for a checkpoint to be resumed: the model's shape and the stream's content and order.
RESUME_KEYS = ("model", "data.seq_len", "data.shards", "data.val_shards", "data.val_fraction", "run.seed",
               "train.zero_stage")


class CheckpointError(LlmrayError):
    pass


# ---- writing ---------------------------------------------------------------------------------------------

def save(engine, directory: str, state: dict, rank: int, tokenizer=None) -> None:
    """Every rank calls this with its own (empty) folder; Ray Train merges the folders into one checkpoint."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # The universal-checkpoint tag lets `ds_to_universal` re-partition the ZeRO shards for another world size.
    engine.save_checkpoint(directory, tag=TAG, client_state={
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
    _write_json(Path(directory, RNG_DIR, f"rank-{rank}.json"), _rng_state())
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))
        _write_json(Path(directory, STATE_FILE), state)
    files = {str(p.relative_to(directory)): p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()}
    _write_json(Path(directory, DONE_DIR, f"rank-{rank}.json"), {"files": files})


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate()[1], "numpy": [np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(directory: str, rank: int) -> bool:
    path = Path(directory, RNG_DIR, f"rank-{rank}.json")
    if not path.is_file():
        return False
    s = json.loads(path.read_text())
    random.setstate((3, tuple(s["python"]), None))
    keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))
    return True


# ---- reading and checking ---------------------------------------------------------------------------------

def _read_json(fs: pafs.FileSystem, path: str, what: str, ckpt: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {what} is missing") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {ckpt} is truncated: {what} is not valid JSON") from None


def verify(uri: str) -> dict:
    """The checkpoint's state, after checking that every rank finished writing it (local path or URI)."""
    fs, root = storage.resolve(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise CheckpointError(f"checkpoint {uri} does not exist")
    state = _read_json(fs, storage.join(root, STATE_FILE), STATE_FILE, uri)
    infos = {i.path: i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))}
    for rank in range(state.get("world_size", 1)):
        done = _read_json(fs, storage.join(root, DONE_DIR, f"rank-{rank}.json"), f"rank {rank}'s completion marker",
                          uri)
        for rel, size in done["files"].items():
            info = infos.get(storage.join(root, rel))
            if info is None:
                raise CheckpointError(f"checkpoint {uri} is incomplete: {rel} (written by rank {rank}) is missing")
            if info.size != size:
                raise CheckpointError(f"checkpoint {uri} is truncated: {rel} has {info.size} of its {size} bytes")
    return state


def read_state(uri: str) -> dict:
    fs, root = storage.resolve(uri)
    return _read_json(fs, storage.join(root, STATE_FILE), STATE_FILE, uri)


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of the run's complete checkpoints, oldest first; incomplete ones are skipped with a word."""
    fs, root = storage.resolve(run_uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        uri = storage.join(run_uri, info.base_name)
        try:
            found.append((verify(uri)["step"], uri))
        except CheckpointError as e:
            print(f"[llmray] skipping {e}", flush=True)
    return sorted(found)


def _get(d: dict, dotted: str):
    for key in dotted.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def check_compatible(state: dict, recipe: dict, vocab_size: int, uri: str) -> None:
    """Refuse to resume a checkpoint whose model shape or data stream differs from the recipe's."""
    saved = state["recipe"]
    diffs = [f"{k}: checkpoint {_get(saved, k)!r}, recipe {_get(recipe, k)!r}" for k in RESUME_KEYS
             if _get(saved, k) != _get(recipe, k)]
    if state.get("vocab_size") not in (None, vocab_size):
        diffs.append(f"tokenizer vocabulary: checkpoint {state['vocab_size']}, recipe {vocab_size}")
    if diffs:
        raise CheckpointError(f"checkpoint {uri} cannot be resumed with this recipe; it differs in "
                              + "; ".join(diffs))


# ---- loading into an engine -------------------------------------------------------------------------------

def needs_universal(state: dict, world_size: int, zero_stage: int) -> bool:
    """ZeRO 1-3 shards are cut for the world size that wrote them; another world size loads them re-partitioned."""
    return zero_stage > 0 and state.get("world_size", world_size) != world_size


def to_universal(directory: str) -> str:
    """Convert the DeepSpeed states under `directory` into DeepSpeed's universal (world-size free) layout."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = os.path.join(directory, UNIVERSAL_DIR)
    args = argparse.Namespace(input_folder=os.path.join(directory, TAG), output_folder=os.path.join(out, TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with weights_only_loads():
        ds_to_universal(args)
    Path(out, "latest").write_text(TAG)
    return out


def load(engine, directory: str, universal: bool) -> None:
    source = to_universal(directory) if universal else directory
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(source, tag=TAG)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no states to load in checkpoint {directory}")


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="llmray-ckpt-")
