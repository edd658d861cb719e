"""Checkpoint contents and their checks.

A checkpoint folder holds:
  state/                 DeepSpeed's engine states, each rank writing its own ZeRO shards (universal-ready)
  rng/rank-R.json        each rank's Python, NumPy and torch RNG states
  tokenizer/             the tokenizer, so the checkpoint alone can be exported or served
  llmray_state.json      rank 0: the run's TrainState (step, tokens, history, stream position, world size, recipe)
  done/rank-R.json       written last by each rank: the files it wrote and their sizes

A checkpoint counts as complete only when every rank's `done` marker is there and every file it lists has its
size; anything less (a crash mid-upload, a truncated copy) is reported as incomplete and never resumed from.
This module owns the folder's layout; what to resume and how is `resume.py`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from llmray import storage
from llmray.errors import LlmrayError
from llmray.train.state import TrainState

TAG = "state"  # DeepSpeed sub-folder; fixed so a checkpoint's layout never depends on the step
STATE_FILE = "llmray_state.json"
DONE_DIR = "done"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(LlmrayError):
    pass


class CheckpointUploadError(CheckpointError):
    """A checkpoint could not be written to the run's storage. It is never resumed from: its ranks' completion
    markers or the files they list are missing, which `verify` refuses."""


# ---- writing ---------------------------------------------------------------------------------------------

def save(directory: str, rank: int, engine, state: TrainState, tokenizer=None) -> None:
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
        _write_json(Path(directory, STATE_FILE), state.to_json())
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


def verify(uri: str) -> TrainState:
    """The checkpoint's state, after checking that every rank finished writing it (local path or URI)."""
    fs, root = storage.resolve(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise CheckpointError(f"checkpoint {uri} does not exist")
    state = read_state(uri)
    infos = {i.path: i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))}
    for rank in range(state.world_size):
        done = _read_json(fs, storage.join(root, DONE_DIR, f"rank-{rank}.json"), f"rank {rank}'s completion marker",
                          uri)
        for rel, size in done["files"].items():
            info = infos.get(storage.join(root, rel))
            if info is None:
                raise CheckpointError(f"checkpoint {uri} is incomplete: {rel} (written by rank {rank}) is missing")
            if info.size != size:
                raise CheckpointError(f"checkpoint {uri} is truncated: {rel} has {info.size} of its {size} bytes")
    return state


def read_state(uri: str) -> TrainState:
    """The checkpoint's state, unverified (the run's history, for a summary or a plot)."""
    fs, root = storage.resolve(uri)
    return TrainState.from_json(_read_json(fs, storage.join(root, STATE_FILE), STATE_FILE, uri))


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
            found.append((verify(uri).step, uri))
        except CheckpointError as e:
            print(f"[llmray] skipping {e}", flush=True)
    return sorted(found)


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="llmray-ckpt-")
