"""What a training step minimises, chosen by the recipe. Every objective takes the engine and one micro-batch's
model inputs (`train.batch.model_inputs`) and returns the loss to back-propagate and its named parts, which the
loop averages over the window and reports beside the loss.

- next-token prediction (`NextToken`): pretraining, continued pretraining and supervised fine-tuning, where the
  labels say which tokens count (all of a text row; the assistant's tokens of a conversation);
- distillation (`distill.Distillation`): a recipe's `distill:` block;
- preference tuning (`preference.Preference`: DPO, IPO, SimPO): a recipe's `preference:` block.
"""

from __future__ import annotations

from typing import Protocol

import torch

from llmray.recipe.schema import Recipe


class Objective(Protocol):
    parts: tuple[str, ...]  # the metric names of the loss's reported parts (none: the loss alone)

    def loss(self, engine, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class NextToken:
    """The model's own next-token loss over the labelled tokens."""

    parts: tuple[str, ...] = ()

    def loss(self, engine, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return engine(**inputs).loss, {}


def reference_copy(recipe: Recipe, device: torch.device, dtype: torch.dtype,
                   built: torch.nn.Module | None) -> torch.nn.Module | None:
    """The frozen copy of model.pretrained a preference or RL reference of mode "copy" reads: the one training built
    (partitioned under ZeRO-3), else a whole copy loaded on this rank; None in any other mode."""
    if recipe.reference != "copy":
        return None
    if built is not None:
        return built
    from llmray.model.build import frozen

    return frozen(recipe.model.pretrained, "model.pretrained", device, dtype)


def for_recipe(recipe: Recipe, device: torch.device, dtype: torch.dtype,
               reference: torch.nn.Module | None = None) -> Objective:
    """The recipe's objective, built on this rank (`dtype`: the engine's compute precision, for a teacher;
    `reference`: a preference reference copy training has built, partitioned under ZeRO-3)."""
    if recipe.distill is not None:
        from llmray.objectives.distill import Distillation

        return Distillation(recipe.distill, device, dtype)
    if recipe.preference is not None:
        from llmray.objectives.preference import Preference

        return Preference(recipe, device, dtype, reference)
    return NextToken()
