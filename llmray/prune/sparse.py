"""Unstructured and N:M pruning of the decoder's Linear layers: zero the lowest-scoring weights of each output
row, scored by |W| (magnitude) or |W| * ||x|| (Wanda: the weight times its input's activation norm on the
calibration text). The zeros are stored densely. `keep_zeros` holds them at zero while a pruned model retrains."""

from __future__ import annotations

import torch

from llmray.prune.calibrate import flat, run_with_hooks


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside the decoder blocks (embeddings and the LM head stay dense)."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{name}"}


def input_norms(model, samples, linears: dict) -> dict[str, torch.Tensor]:
    """||x_j||_2 over the calibration tokens, per input channel j of each Linear layer (Wanda's activation term)."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def record(name: str):
        def hook(module, args, output) -> None:
            sums[name].add_(flat(args[0]).pow(2).sum(0).double().cpu())
        return hook

    run_with_hooks(model, samples, {m: record(name) for name, m in linears.items()})
    return {name: s.sqrt().float() for name, s in sums.items()}


@torch.no_grad()
def prune_weights(linears: dict, sparsity: float | None, pattern: tuple[int, int] | None,
                  norms: dict[str, torch.Tensor] | None = None) -> None:
    """Zero, in place, the lowest-scoring weights of each output row (score |W|, or |W| * ||x|| with `norms`):
    a `sparsity` share of the row, or all but N of every M consecutive inputs."""
    for name, linear in linears.items():
        w = linear.weight
        score = w.abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device)[None, :]
        if pattern is not None:
            n, m = pattern
            groups = score.reshape(w.shape[0], -1, m)
            drop = groups.topk(m - n, dim=-1, largest=False).indices
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
        else:
            k = int(w.shape[1] * sparsity)
            drop = score.topk(k, dim=1, largest=False).indices
            mask = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
        w.mul_(mask.to(w.dtype))


def nonzero_share(model) -> float:
    linears = decoder_linears(model).values()
    return sum(int(m.weight.count_nonzero()) for m in linears) / sum(m.weight.numel() for m in linears)


def keep_zeros(model) -> int:
    """Hold every decoder weight that is zero now at zero through training: its gradient is masked to zero from
    the first step, so Adam's moments for it stay zero and its update is 0 (weight decay of 0 is 0). Returns how
    many weights are held. Registered before DeepSpeed wraps the model; the hook sees the full gradient."""
    held = 0
    for linear in decoder_linears(model).values():
        mask = linear.weight.detach().ne(0)
        if mask.all():
            continue
        held += int((~mask).sum())
        linear.weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
    return held
