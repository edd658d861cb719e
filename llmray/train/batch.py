"""A stream batch (numpy rows) into the model's forward arguments."""

from __future__ import annotations

import numpy as np
import torch

from llmray.data.pixels import PER_CROP_INPUTS, PER_IMAGE_INPUTS, PER_TOKEN_INPUTS
from llmray.data.template import IGNORE_INDEX


def model_inputs(batch: dict, device: torch.device, rows: slice = slice(None), flat: bool = False,
                 sequences: bool = False, pixels_per_row: bool = False) -> dict[str, torch.Tensor]:
    """The forward's arguments for `rows` of a batch: input ids, labels (the ids themselves for plain text; the
    assistant's tokens only for conversations), and position ids where documents are packed (conversations,
    data.document_masking).

    `flat` (flash attention): rows with position ids go in as one row, because transformers reads restarting
    position ids as flash-attn's varlen sequences only in a batch of one. Each row's first label is dropped, so
    no row's last token learns to predict the next row's first: the same loss terms as row by row.

    Image conversations' rows also give their image inputs (`image_inputs`) and the processor's per-token inputs
    (`pixels.PER_TOKEN_INPUTS`: Gemma 3's token types, Qwen2-VL's multimodal token types) like the ids.

    `sequences`: also the rows' `sequence_ids` (preference pairs), for the objective, not the forward; made unique
    across the rows when they are flattened into one (the parity of each id, chosen or rejected, kept); and their
    `reference_logps` where the reference was precomputed."""
    def tensor(name: str) -> torch.Tensor:  # a copy: Ray's arrays are read-only
        return torch.from_numpy(np.array(batch[name][rows], dtype=np.int64)).to(device, non_blocking=True)

    ids = tensor("input_ids")
    # no KV cache: with one, transformers ignores the position ids' restarts and packed conversations attend to
    # each other
    out = {"input_ids": ids, "labels": tensor("labels") if "labels" in batch else ids, "use_cache": False}
    if sequences and "sequence_ids" in batch:
        ids_of = tensor("sequence_ids")
        if flat:
            offset = 2 * ids_of.shape[1] * torch.arange(ids_of.shape[0], device=ids_of.device).unsqueeze(1)
            ids_of = torch.where(ids_of > 0, ids_of + offset, ids_of)
        out["sequence_ids"] = ids_of
        if "reference_logps" in batch:  # float: each sequence's precomputed reference sum, on its first token
            out["reference_logps"] = torch.from_numpy(np.array(batch["reference_logps"][rows], dtype=np.float32)).to(
                device, non_blocking=True)
    if "pixel_values" in batch:  # each row's images, in row order: the model fills its image tokens with them
        out.update(image_inputs(batch, rows, device, pixels_per_row))
        out.update({name: tensor(name) for name in PER_TOKEN_INPUTS if name in batch})
    if "position_ids" in batch:
        out["position_ids"] = tensor("position_ids")
        if flat:
            out["labels"] = out["labels"].clone()
            out["labels"][:, 0] = IGNORE_INDEX
            out = {k: v.reshape(1, -1) if torch.is_tensor(v) else v for k, v in out.items()}
    return out


def image_inputs(batch: dict, rows: slice, device: torch.device, pixels_per_row: bool = False) -> dict[str, torch.Tensor]:
    """The rows' images as the forward takes them ({} when none holds one): every row's images in row order in one
    `pixel_values` (LLaVA, Gemma 3: (images, C, H, W); a row held as a list (`pixels.ImageLayout.listed`: Qwen2-VL's
    patches, Gemma 3's pan-and-scan crops): each row's first `pixel_count` entries) with each image's PER_IMAGE_INPUTS
    entry (Qwen2-VL's `image_grid_thw`, (images, 3)), or with `pixels_per_row` (Idefics3's forward) as (rows,
    max_images, C, H, W), or its crops (rows, most crops, C, H, W) with their PER_CROP_INPUTS, the model dropping the
    all-zero slots."""
    counts = np.asarray(batch["image_count"][rows])
    pixels = np.asarray(batch["pixel_values"][rows])
    held = np.arange(max(1, int(counts.max(initial=0))))[None, :] < counts[:, None]
    if not held.any():
        return {}
    if pixels_per_row:
        chosen = pixels
    elif "pixel_count" in batch:
        chosen = np.concatenate([row[:n] for row, n in zip(pixels, np.asarray(batch["pixel_count"][rows]))])
    else:
        chosen = pixels[:, :held.shape[1]][held]
    out = {"pixel_values": torch.from_numpy(np.array(chosen, dtype=np.float32)).to(device, non_blocking=True)}
    for name in PER_CROP_INPUTS:
        if name in batch:
            out[name] = torch.from_numpy(np.array(batch[name][rows], dtype=bool)).to(device, non_blocking=True)
    for name in PER_IMAGE_INPUTS:
        if name in batch:
            held_entries = np.asarray(batch[name][rows])[:, :held.shape[1]][held]
            out[name] = torch.from_numpy(np.array(held_entries, dtype=np.int64)).to(device, non_blocking=True)
    return out
