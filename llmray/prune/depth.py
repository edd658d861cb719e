"""Depth pruning: drop the decoder layers that change the hidden state least on the calibration text (block
influence, 1 - cos(h_in, h_out), as ShortGPT and Minitron rank them). The result has fewer layers in config.json."""

from __future__ import annotations

import torch

from llmray.prune.calibrate import batches


@torch.no_grad()
def block_influence(model, samples) -> list[float]:
    """Per decoder layer: 1 - mean cosine similarity between its input and output hidden states."""
    scores = None
    for ids in batches(model, samples):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum().item()
               for a, b in zip(hidden[:-1], hidden[1:])]
        scores = cos if scores is None else [s + c for s, c in zip(scores, cos)]
    tokens = len(samples) * len(samples[0])
    return [1.0 - s / tokens for s in scores]


def least_influential(influence: list[float], count: int) -> list[int]:
    return sorted(sorted(range(len(influence)), key=influence.__getitem__)[:count])


def drop_layers_of(model, drop: list[int]) -> None:
    """Remove decoder layers `drop` in place; config.json then says the new depth."""
    keep = [i for i in range(model.config.num_hidden_layers) if i not in drop]
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):  # attention layers know their index (for KV caches)
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        model.config.layer_types = [types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
