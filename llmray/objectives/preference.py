"""Preference tuning as a training objective: DPO, IPO and (reference-free) SimPO over packed preference pairs.

A micro-batch's rows hold whole pairs (`data.pack.pair_rows`): each side is prompt + completion, packed as its own
sequence, labelled on its completion, numbered in `sequence_ids` (2k+1 chosen, 2k+2 rejected). Chosen and rejected
go through one forward pass; each side's log-probability is summed over its completion tokens. The reference's
come from the same rows under no_grad: the base with the LoRA adapters off (no second copy), or a frozen copy of
model.pretrained on every rank; or they stream with the rows, precomputed once before training
(`objectives/reference.py`). The formulas and the reported rewards are TRL's (DPOTrainer: sigmoid, ipo;
CPOTrainer: simpo), checked against it in tests/unit/test_preference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmray import metric_names as M
from llmray.data.template import IGNORE_INDEX
from llmray.recipe.schema import PreferenceSettings, Recipe


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each labelled token (labels unshifted: position t is predicted at t - 1), 0 where
    the label is IGNORE_INDEX."""
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return F.pad(picked, (1, 0))


def sequence_totals(values: torch.Tensor, sequence_ids: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width) sums of (rows, T) `values` over each row's packed sequences: column j the sequence numbered j
    (0: the padding)."""
    rows = sequence_ids.shape[0]
    index = (sequence_ids + width * torch.arange(rows, device=values.device).unsqueeze(1)).flatten()
    totals = torch.zeros(rows * width, dtype=values.dtype, device=values.device).index_add(0, index, values.flatten())
    return totals.view(rows, width)


def pair_sums(values: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(chosen sums, rejected sums, chosen token counts, rejected token counts) of `values` over each pair's
    completion tokens, one entry per pair of the micro-batch, in row order."""
    width = int(sequence_ids.max()) + 2  # + 2: an even number of columns after 0
    sums = sequence_totals(values, sequence_ids, width)
    counts = sequence_totals((labels != IGNORE_INDEX).to(values.dtype), sequence_ids, width)
    present = (counts[:, 1:-1:2] > 0) & (counts[:, 2::2] > 0)  # both sides have completion tokens
    return (sums[:, 1:-1:2][present], sums[:, 2::2][present], counts[:, 1:-1:2][present], counts[:, 2::2][present])


def side_sums(model, inputs: dict, sequence_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`pair_sums` of the model's token log-probabilities on a micro-batch's pairs: one forward for both sides."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return pair_sums(token_log_probs(logits, inputs["labels"]), inputs["labels"], sequence_ids)


def preference_loss(cfg: PreferenceSettings, chosen: torch.Tensor, rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, chosen_tokens: torch.Tensor,
                    rejected_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over the pairs and TRL's metrics, from each side's summed completion log-probabilities
    (policy, and reference unless reference-free) and completion lengths."""
    beta = cfg.beta
    if not len(chosen):  # no whole pair in the micro-batch: nothing to learn, and no NaN
        zero = chosen.sum()
        return zero, {name: zero.detach().float() for name in M.PREFERENCE}
    if cfg.loss == "simpo":
        chosen_avg, rejected_avg = chosen / chosen_tokens, rejected / rejected_tokens
        losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - cfg.simpo_gamma)
        chosen_rewards, rejected_rewards = beta * chosen_avg.detach(), beta * rejected_avg.detach()
    else:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if cfg.loss == "ipo":
            margin = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
            losses = (margin - 1 / (2 * beta)) ** 2
        else:  # dpo, with cDPO's label smoothing
            logits = beta * (chosen_ratio - rejected_ratio)
            eps = cfg.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    loss = losses.mean()
    if cfg.sft_weight:  # RPO: the chosen completions' token-mean NLL over the micro-batch
        loss = loss + cfg.sft_weight * -chosen.sum() / chosen_tokens.sum()
    metrics = {
        M.REWARDS_CHOSEN: chosen_rewards.mean(), M.REWARDS_REJECTED: rejected_rewards.mean(),
        M.REWARDS_ACCURACIES: (chosen_rewards > rejected_rewards).float().mean(),
        M.REWARDS_MARGINS: (chosen_rewards - rejected_rewards).mean(),
        M.LOGPS_CHOSEN: chosen.detach().mean(), M.LOGPS_REJECTED: rejected.detach().mean()}
    return loss, {k: v.float() for k, v in metrics.items()}


class Preference:
    """The recipe's preference loss on a micro-batch of packed pairs; its metrics are the loss's reported parts."""

    parts = M.PREFERENCE

    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype, copy: torch.nn.Module | None = None):
        """`copy`: the reference copy where training built it (ZeRO-3: partitioned across the ranks); else, in copy
        mode, one whole copy is loaded on this rank."""
        from llmray.objectives.objective import reference_copy

        self.cfg, self.mode = recipe.preference, recipe.reference
        self.copy = reference_copy(recipe, device, dtype, copy)

    def reference_sums(self, engine, inputs: dict, sequence_ids: torch.Tensor,
                       precomputed: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
        if self.mode == "none":
            return None
        if self.mode == "precomputed":  # streamed with the rows (objectives/reference.py): no reference here
            return pair_sums(precomputed, inputs["labels"], sequence_ids)
        with torch.no_grad():
            if self.mode == "copy":
                return side_sums(self.copy, inputs, sequence_ids)
            with engine.module.disable_adapter():  # the base the adapters train on: the policy at step 0
                return side_sums(engine.module, inputs, sequence_ids)

    def loss(self, engine, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = dict(inputs)
        sequence_ids, precomputed = inputs.pop("sequence_ids"), inputs.pop("reference_logps", None)
        if self.mode == "precomputed" and precomputed is None:
            raise RuntimeError("preference.reference=precomputed, but the rows carry no reference log-probabilities")
        reference = self.reference_sums(engine, inputs, sequence_ids, precomputed)
        chosen, rejected, chosen_tokens, rejected_tokens = side_sums(engine, inputs, sequence_ids)
        ref_chosen, ref_rejected = (reference[0], reference[1]) if reference is not None else (None, None)
        return preference_loss(self.cfg, chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
