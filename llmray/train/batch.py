"""A stream batch (numpy rows) into the model's forward arguments."""

from __future__ import annotations

import numpy as np
import torch


def model_inputs(batch: dict, device: torch.device, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """The forward's arguments for `rows` of a batch: input ids, labels (the ids themselves for plain text; the
    assistant's tokens only for conversations), and position ids where conversations are packed."""
    def tensor(name: str) -> torch.Tensor:  # a copy: Ray's arrays are read-only
        return torch.from_numpy(np.array(batch[name][rows], dtype=np.int64)).to(device, non_blocking=True)

    ids = tensor("input_ids")
    # no KV cache: with one, transformers ignores the position ids' restarts and packed conversations attend to
    # each other
    out = {"input_ids": ids, "labels": tensor("labels") if "labels" in batch else ids, "use_cache": False}
    if "position_ids" in batch:
        out["position_ids"] = tensor("position_ids")
    return out
