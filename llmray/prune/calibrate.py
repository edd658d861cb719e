"""Calibration: the held-out samples run through the model in batches, with forward hooks recording activations."""

from __future__ import annotations

from collections.abc import Iterator

import torch

CALIBRATION_BATCH = 8


def batches(model, samples) -> Iterator[torch.Tensor]:
    device = next(model.parameters()).device
    for start in range(0, len(samples), CALIBRATION_BATCH):
        yield torch.as_tensor(samples[start:start + CALIBRATION_BATCH], dtype=torch.long, device=device)


@torch.no_grad()
def run_with_hooks(model, samples, hooks: dict) -> None:
    """Run every calibration batch with `hooks` ({module: forward hook}) in place, removed afterwards. A hook
    returns None: a forward hook's return value would replace the module's output."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        for ids in batches(model, samples):
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()


def flat(x: torch.Tensor) -> torch.Tensor:
    """Activations as (tokens, channels), float32."""
    return x.detach().float().reshape(-1, x.shape[-1])
