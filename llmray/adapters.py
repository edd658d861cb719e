"""LoRA adapters through peft: wrapping a model for fine-tuning (only the adapters train), and the adapter or
merged weights an export writes. One place builds the peft config, so training and export wrap identically."""

from __future__ import annotations

import torch

from llmray.config import LoraConfig


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
