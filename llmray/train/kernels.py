"""The fast paths of a training step (`train.kernels`, `train.activation_checkpointing`): `auto` resolved for this
worker (the fast path where it runs: on a GPU, with its library installed), then applied to the model before
DeepSpeed wraps it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from llmray.model.build import build_config
from llmray.recipe.schema import FLASH_ATTENTIONS, Recipe, RecipeError

# each library-backed choice: the module it imports (for `auto` and `check_installed`), and how to install it
LIBRARIES = {"flash_attention_2": ("flash_attn", "pip install flash-attn"),
             "flash_attention_3": ("flash_attn_interface", "build flash-attention's hopper/ folder"),
             "liger": ("liger_kernel", "pip install liger-kernel")}


@dataclass(frozen=True)
class Kernels:
    attention: str  # transformers' attn_implementation
    liger: bool
    compile: bool  # each decoder block through torch.compile
    adam: str  # torch_fused, deepspeed_fused or torch
    recompute_every: int  # activations recomputed in every Nth decoder block; 0: none

    @property
    def flat_rows(self) -> bool:
        """Packed rows go in as one row: flash attention reads restarting position ids only in a batch of one."""
        return self.attention in FLASH_ATTENTIONS

    def describe(self) -> str:
        ac = {0: "off", 1: "every block"}.get(self.recompute_every, f"every {self.recompute_every} blocks")
        return (f"attention {self.attention}, liger {'on' if self.liger else 'off'}, "
                f"compile {'on' if self.compile else 'off'}, AdamW {self.adam}, activation checkpointing {ac}")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def adam_impl(recipe: Recipe) -> str:
    a = recipe.train.kernels.adam
    return "torch_fused" if a == "auto" else a  # one kernel on CPU and GPU, and nothing to build


def flash_runs_here(precision: str) -> bool:
    """flash-attn computes in bf16/fp16, on Ampere or newer."""
    return precision in ("bf16", "fp16") and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve(recipe: Recipe, on_gpu: bool, precision: str) -> Kernels:
    """The kernels this worker runs; `precision` is the run's resolved one (bf16, fp16 or fp32)."""
    k, t = recipe.train.kernels, recipe.train
    attention = k.attention
    if attention == "auto":
        flash = on_gpu and flash_runs_here(precision) and installed(LIBRARIES["flash_attention_2"][0])
        attention = "flash_attention_2" if flash else "sdpa"
    elif attention in FLASH_ATTENTIONS and not flash_runs_here(precision):
        raise RecipeError(f"train.kernels.attention={attention} needs bf16 or fp16 on an Ampere or newer GPU; this "
                          f"run trains in {precision}: set train.precision=bf16 or the attention to sdpa")
    liger = k.liger
    if liger == "auto":
        liger = on_gpu and installed(LIBRARIES["liger"][0]) and recipe.distill is None and liger_covers(recipe)
    elif liger and not liger_covers(recipe):
        raise RecipeError(f"train.kernels.liger=true: liger-kernel has no kernels for model type "
                          f"{model_type(recipe)!r}; set it to auto (on where liger covers the model) or false")
    compiled = k.compile
    if compiled == "auto":
        compiled = on_gpu and t.zero_stage < 3
    return Kernels(attention, liger, compiled, adam_impl(recipe), t.recompute_every)


def model_type(recipe: Recipe) -> str:
    m = recipe.model
    return m.arch if m.pretrained is None else build_config(m, vocab_size=0).model_type


def liger_model_types() -> set[str]:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_covers(recipe: Recipe) -> bool:
    """Whether liger-kernel patches this architecture: it leaves others as they are, saying so only at info level."""
    return model_type(recipe) in liger_model_types()


def check_installed(recipe: Recipe) -> None:
    """Refuse, before any worker starts, a kernel asked for by name whose library is not installed."""
    k = recipe.train.kernels
    asked = {"train.kernels.attention": k.attention, "train.kernels.liger": "liger" if k.liger is True else None}
    for key, choice in asked.items():
        if choice in LIBRARIES and not installed(LIBRARIES[choice][0]):
            package, how = LIBRARIES[choice]
            raise RecipeError(f"{key}={'true' if choice == 'liger' else choice} needs the {package} package, which "
                              f"is not installed ({how}); or set it to auto")


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks, whatever the architecture: transformers builds them on GradientCheckpointingLayer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply(model: torch.nn.Module, kernels: Kernels, adapters: bool) -> None:
    """The kernels put in place, on a model not yet wrapped by DeepSpeed (a peft model: on its base)."""
    model.set_attn_implementation(kernels.attention)
    if kernels.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model() if adapters else model)
    if kernels.recompute_every:
        model.activation_checkpointing_enable(every_n_layers=kernels.recompute_every)
        model.config.use_cache = False
        if adapters:
            model.enable_input_require_grads()  # the frozen embeddings' output must carry grad into checkpoints
    if kernels.compile:
        for block in decoder_blocks(model):
            block.compile()


def gather_lm_head_for_liger(engine, kernels: Kernels, zero3: bool) -> None:
    """liger's loss reads the LM head's weight inside the model's own forward, which ZeRO-3 does not gather for
    (it gathers a module's parameters as that module runs): register it with the model, as DeepSpeed asks."""
    if kernels.liger and zero3:
        import deepspeed

        model = engine.module
        deepspeed.zero.register_external_parameter(model, model.get_output_embeddings().weight)
