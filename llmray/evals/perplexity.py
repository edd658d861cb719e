"""Perplexity, measured one way everywhere: a forward's summed next-token loss over its labelled tokens (the
training ranks' validation, held-out samples of a model folder, an eval task's texts), and that loss read as a
perplexity by one helper."""

from __future__ import annotations

import math

import numpy as np
import torch

from llmray.data.template import IGNORE_INDEX

MAX_LOSS = 50.0  # exp() of a diverged run's loss overflows; no perplexity above e^50 says anything more


def perplexity(mean_nll: float) -> float:
    """A mean next-token loss (nats) as a perplexity."""
    return math.exp(min(mean_nll, MAX_LOSS))


def summed_nll(model, inputs: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, tokens predicted) of one forward of `inputs` (input_ids, and
    labels where only some tokens count: IGNORE_INDEX elsewhere). Read from the model's own loss, so a fused
    loss that never materialises the logits (liger) measures the same way. Every caller forwards, also with nothing
    to count: under ZeRO-3 a forward is a collective."""
    labels = inputs.get("labels", inputs["input_ids"])
    count = int((labels[..., 1:] != IGNORE_INDEX).sum())
    loss = model(**{**inputs, "labels": labels}).loss
    return (loss.float().item() * count, count) if count else (0.0, 0)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def held_out_perplexity(model: torch.nn.Module, samples: np.ndarray, batch_size: int = 8,
                        positions: np.ndarray | None = None) -> dict:
    """Token-weighted mean next-token loss over packed samples (`measure.held_out_samples`), and its perplexity.
    With `positions` (position ids restarting at each document, `pack.document_positions`), each document is read
    on its own."""
    device, total, count = model_device(model), 0.0, 0
    for start in range(0, len(samples), batch_size):
        inputs = {"input_ids": torch.from_numpy(samples[start:start + batch_size].astype(np.int64)).to(device)}
        if positions is not None:  # no KV cache: with one, transformers ignores the restarts
            inputs["position_ids"] = torch.from_numpy(positions[start:start + batch_size].astype(np.int64)).to(device)
            inputs["use_cache"] = False
        nll, n = summed_nll(model, inputs)
        total += nll
        count += n
    loss = total / count
    return {"loss": loss, "ppl": perplexity(loss), "tokens": count}
