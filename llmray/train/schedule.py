"""Learning-rate schedule: linear warmup, then cosine, linear or constant down to `min_lr_ratio`."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from llmray.recipe.schema import TrainSettings


def lr_factor(step: int, t: TrainSettings) -> float:
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def make_scheduler(t: TrainSettings):
    """A factory DeepSpeed calls with its optimizer (it steps the scheduler at each optimizer step)."""
    return lambda optimizer: LambdaLR(optimizer, lambda step: lr_factor(step, t))
