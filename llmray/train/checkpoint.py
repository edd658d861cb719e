"""Checkpoint contents: DeepSpeed's engine states (every rank writes its own shards) plus `llmray_state.json`
(step, tokens, metric history, the recipe's shape) written by rank 0."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmray.errors import LlmrayError

TAG = "state"  # DeepSpeed sub-folder; fixed so a checkpoint's layout never depends on the step
STATE_FILE = "llmray_state.json"


class CheckpointError(LlmrayError):
    pass


def save(engine, directory: str, state: dict, rank: int) -> None:
    engine.save_checkpoint(directory, tag=TAG)
    if rank == 0:
        tmp = Path(directory, STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, Path(directory, STATE_FILE))


def read_state(directory: str) -> dict:
    path = Path(directory, STATE_FILE)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {STATE_FILE}: it is incomplete or not an llmray checkpoint")
    return json.loads(path.read_text())


def load(engine, directory: str) -> dict:
    state = read_state(directory)
    if not Path(directory, TAG).is_dir():
        raise CheckpointError(f"checkpoint {directory} has no DeepSpeed states under {TAG}/")
    load_path, _ = engine.load_checkpoint(directory, tag=TAG)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {directory}")
    return state
