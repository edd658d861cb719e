"""The DeepSpeed config a recipe asks for: ZeRO stage, offload, precision, batch arithmetic, AdamW, clipping.

The recipe's raw `train.deepspeed` JSON is merged last, so power users can override anything.
"""

from __future__ import annotations

import copy
from typing import Any

from llmray.recipe.schema import Recipe
from llmray.train.kernels import adam_impl


def resolve_precision(recipe: Recipe, bf16_supported: bool) -> str:
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if recipe.scaling.use_gpu and bf16_supported else "fp32"
    return p


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(recipe: Recipe, precision: str) -> dict[str, Any]:
    t, s = recipe.train, recipe.scaling
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update(overlap_comm=s.use_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e4)
    zpp = recipe.quant.zeropp
    if zpp.enabled:  # ZeRO++ (arXiv 2306.10209); the recipe check keeps it to ZeRO-3 on GPUs
        zero.update(zero_quantized_weights=zpp.quantized_weights, zero_quantized_gradients=zpp.quantized_gradients,
                    zero_hpz_partition_size=zpp.hpz_partition_size)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": s.use_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": s.use_gpu}
    adam = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
    impl = adam_impl(recipe)
    if not t.offload_optimizer and impl != "deepspeed_fused":  # offload steps DeepSpeed's CPU Adam
        adam["torch_adam"] = True
        adam["fused"] = impl == "torch_fused"  # DeepSpeed passes it on to torch.optim.AdamW
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": recipe.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 12},
        "steps_per_print": 10**9,  # llmray reports progress itself
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 0 and precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if t.deepspeed:
        config = deep_merge(config, t.deepspeed)
    return config
