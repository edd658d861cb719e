"""Each request's sampling: its parameters, the next token drawn from a row's logits (greedy, temperature, top-k, top-p,
with the request's own seeded generator), and the log-probabilities a request may ask for."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each generated token's log-probability, and this many of the most likely
    top_k: int = 0  # draw among the k most likely tokens only (0: all)


@dataclass
class TokenLogprob:
    """One token of a text and its log-probability under the model (None for a prompt's first token), with the
    `top` most likely tokens at its place (id, log-probability), most likely first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in one place's log-probabilities, with the `top` most likely tokens there."""
    best = torch.topk(logprobs, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)


def sample(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab], each drawn as its request's sampling says."""
    if all(s.temperature == 0 for s in samplings):
        return logits.argmax(-1)  # all greedy: one op for the batch
    out = torch.empty(len(samplings), dtype=torch.long, device=logits.device)
    for i, (s, generator) in enumerate(zip(samplings, generators)):
        if s.temperature == 0:
            out[i] = logits[i].argmax()
            continue
        probs = torch.softmax(logits[i] / s.temperature, dim=-1)
        if 0 < s.top_k < probs.numel():
            kept = probs.topk(s.top_k)
            probs = torch.zeros_like(probs).scatter(0, kept.indices, kept.values)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest prefix reaching top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        out[i] = torch.multinomial(probs, 1, generator=generator)[0]
    return out
