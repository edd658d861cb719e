"""LoRA adapters through peft: wrapping a model for fine-tuning (only the adapters train), and the adapter or
merged weights an export writes. One place builds the peft config, so training and export wrap identically.
QLoRA's 4-bit frozen base comes from bitsandbytes through transformers' quantization config."""

from __future__ import annotations

import torch

from llmray.recipe.schema import LoraSettings, QloraSettings, RecipeError


def lora_config(cfg: LoraSettings, model: torch.nn.Module | None = None, train_tower: bool = False):
    """peft's config. For a vision-language `model`, the adapters go on the language model only: the projector (and
    with `train_tower` the vision tower) trains in full beside them (peft's modules_to_save), a frozen tower stays
    as it is."""
    import re

    from peft import LoraConfig as PeftLoraConfig

    from llmray.model.build import is_vision_language, vision_parts

    extra = {}
    if model is not None and is_vision_language(model.config):
        towers, projectors = vision_parts(model)
        full = [n.rsplit(".", 1)[-1] for n in projectors + (towers if train_tower else [])]
        names = "|".join(re.escape(n) for n in towers + projectors)
        extra = {"exclude_modules": rf"^({names})(\..*)?$", "modules_to_save": sorted(set(full)) or None}
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                          target_modules=cfg.target_modules, **extra)


def with_lora(model: torch.nn.Module, cfg: LoraSettings, train_tower: bool = False) -> torch.nn.Module:
    """`model` wrapped with fresh LoRA adapters; every other parameter frozen (requires_grad False), but a VLM's
    projector (and with `train_tower` its vision tower): see `lora_config`."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg, model, train_tower))


def four_bit(cfg: QloraSettings, compute_dtype: torch.dtype, config):
    """The transformers quantization config of a QLoRA base whose config is `config`: the language model's Linear
    layers 4-bit; a vision-language model's tower and projector left as they are (`unquantized`)."""
    from transformers import BitsAndBytesConfig

    from llmray.model.build import is_vision_language

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=unquantized(config) if is_vision_language(config) else None)


def unquantized(config) -> list[str]:
    """The modules of a vision-language model a 4-bit base keeps in full precision: the vision tower (frozen, or
    trained in full with vision.train_tower) and the projector (trained in full beside the adapters), besides what
    transformers keeps by default (the LM head), which a skip list replaces. Built on the meta device."""
    from transformers.quantizers.base import get_keys_to_not_convert

    from llmray.model.build import model_class, vision_parts

    with torch.device("meta"):
        model = model_class(config).from_config(config)
    towers, projectors = vision_parts(model)
    return sorted({*towers, *projectors, *get_keys_to_not_convert(model)})


def prepare_four_bit(model: torch.nn.Module) -> torch.nn.Module:
    """peft's preparation of a k-bit base for training: everything frozen, the few full-precision layers (norms,
    embeddings, head) in fp32 for stable gradients, and the input embeddings' output requiring grad."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def check_qlora() -> None:
    """Refuse, before any worker starts, a QLoRA run where bitsandbytes cannot load."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a native library that fails to load on this platform
        raise RecipeError(f"finetune.method=qlora needs bitsandbytes for its 4-bit base, which does not load here "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "use finetune.method=lora") from None


def trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    from llmray.model.flops import weights_in

    return (sum(weights_in(p) for p in model.parameters() if p.requires_grad),
            sum(weights_in(p) for p in model.parameters()))


def linear_names(config) -> list[str]:
    """The distinct names (last dotted part) of a model's Linear layers, the LM head aside: what
    `target_modules` may name. The model is built on the meta device: no memory, no weights read."""
    from llmray.model.build import model_class

    with torch.device("meta"):
        model = model_class(config).from_config(config)
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def check_targets(config, cfg: LoraSettings) -> None:
    """Refuse, before any worker starts, `finetune.lora.target_modules` that name no Linear layer of the model."""
    if cfg.target_modules == "all-linear":
        return
    names = linear_names(config)
    unknown = [t for t in cfg.target_modules if t not in names]
    if unknown:
        raise RecipeError(f"finetune.lora.target_modules: {', '.join(map(repr, unknown))} not among the model's "
                          f"Linear layers: {', '.join(names)}")
