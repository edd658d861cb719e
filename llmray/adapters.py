"""LoRA adapters through peft: wrapping a model for fine-tuning (only the adapters train), and the adapter or
merged weights an export writes. One place builds the peft config, so training and export wrap identically."""

from __future__ import annotations

import torch

from llmray.config import LoraConfig, RecipeError


def lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                          target_modules=cfg.target_modules)


def with_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """`model` wrapped with fresh LoRA adapters; every other parameter frozen (requires_grad False)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))


def trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def linear_names(config) -> list[str]:
    """The distinct names (last dotted part) of a model's Linear layers, the LM head aside: what
    `target_modules` may name. The model is built on the meta device: no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def check_targets(config, cfg: LoraConfig) -> None:
    """Refuse, before any worker starts, `finetune.lora.target_modules` that name no Linear layer of the model."""
    if cfg.target_modules == "all-linear":
        return
    names = linear_names(config)
    unknown = [t for t in cfg.target_modules if t not in names]
    if unknown:
        raise RecipeError(f"finetune.lora.target_modules: {', '.join(map(repr, unknown))} not among the model's "
                          f"Linear layers: {', '.join(names)}")
