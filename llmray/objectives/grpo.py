"""GRPO's arithmetic (issue 28's first part): group-normalised advantages, and the clipped policy loss with its KL
to the reference, in the loss variants users ask for. Per-token log-probabilities in, loss and TRL's metric names
out; the rollouts, rewards and weight sync that feed it are built on top.

    advantage   reward minus its group's mean, over the group's std (scale "group"), the batch's ("batch"), or
                not scaled ("none": Dr. GRPO)
    per token   -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL, ratio = pi / pi_old,
                KL = pi_ref / pi - log(pi_ref / pi) - 1 (k3, never negative), times the ratio by default
    loss        grpo: each completion's mean, then the mean over completions (length-biased);
                bnpo: the mean over the micro-batch's tokens; dr_grpo: the sum over (completions x the longest
                completion allowed); dapo: the sum over the tokens of the whole optimizer step (`normalizer`)

Checked against TRL 1.16's GRPOTrainer in tests/unit/test_grpo.py.
"""

from __future__ import annotations

from typing import Literal

import torch

from llmray.metric_names import CLIP_HIGH, CLIP_LOW, CLIP_REGION, KL

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # added to the std before dividing (TRL's): a group whose rewards are all equal gets advantage 0



def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale: Literal["group", "batch", "none"] = "group") -> torch.Tensor:
    """(n,) advantages of (n,) rewards laid out group after group (n a multiple of group_size). A NaN reward (a
    completion no reward function scored) is left out of its group's mean and std and gets advantage 0, as TRL's."""
    grouped = rewards.view(-1, group_size)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).flatten()
    if scale == "none":
        return torch.nan_to_num(centred, nan=0.0)
    std = nanstd(grouped, dim=1).repeat_interleave(group_size) if scale == "group" else nanstd(rewards)
    return torch.nan_to_num(centred / (std + STD_EPS), nan=0.0)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased std of the values that are not NaN."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim)
    return (torch.nanmean((values - mean) ** 2, dim=dim) * count / (count - 1)).sqrt()


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo", epsilon_low: float = 0.2,
                epsilon_high: float = 0.2, beta: float = 0.0, kl_ratio: bool = True,
                max_completion_length: int | None = None, normalizer: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a micro-batch of (B, T) per-token completion log-probabilities under the policy (with grad), the
    policy that sampled them (old), and the reference (None when beta is 0); `mask` 1 on completion tokens.
    `kl_ratio`: the KL weighted by the ratio, so its gradient is the unbiased reverse-KL one off-policy
    (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default). `max_completion_length`: dr_grpo's constant.
    `normalizer`: dapo's token count (the optimizer step's completion tokens over all ranks, divided by ranks x
    micro-batches, so the summed gradients are its token mean)."""
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics = {}
    if beta != 0.0:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        if kl_ratio:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics[KL] = masked_mean(kl.detach(), mask)
    masked = per_token * mask
    summed = masked.sum()
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = summed / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = summed / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = summed / max(normalizer, 1.0)
    else:
        raise ValueError(f"unknown GRPO loss type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    metrics.update({CLIP_LOW: masked_mean(low.float(), mask), CLIP_HIGH: masked_mean(high.float(), mask),
                    CLIP_REGION: masked_mean((low | high).float(), mask)})
    return loss, metrics


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
