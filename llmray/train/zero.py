"""The DeepSpeed config a recipe asks for: ZeRO stage, offload, precision, batch arithmetic, AdamW, clipping.

The keys the recipe decides are written from one table (`recipe_owned`), which is also what the recipe's raw
`train.deepspeed` JSON is checked against: it may add DeepSpeed features and retune llmray's own defaults (bucket
sizes, overlap, ZeRO-3 thresholds), but a key the recipe owns, set there to another value, is refused naming both.
"""

from __future__ import annotations

import copy
from typing import Any

from llmray.recipe.schema import Recipe, RecipeError
from llmray.train.kernels import adam_impl

# What the recipe decides about the learning rate's course: DeepSpeed's own scheduler would replace it.
SCHEDULE_KEYS = "train.schedule, train.lr, train.warmup_steps and train.min_lr_ratio"


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


def recipe_owned(recipe: Recipe, precision: str) -> dict[str, tuple[str, Any]]:
    """DeepSpeed key (dotted) -> (the recipe key that decides it, the value it gives)."""
    t, zpp = recipe.train, recipe.quant.zeropp
    owned = {
        "train_batch_size": ("train.global_batch_size", t.global_batch_size),
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", t.micro_batch_size),
        "gradient_accumulation_steps": ("train.global_batch_size / (train.micro_batch_size x scaling.num_workers)",
                                        recipe.grad_accum_steps),
        "gradient_clipping": ("train.grad_clip", t.grad_clip),
        "optimizer.type": ("llmray's AdamW", "AdamW"),
        "optimizer.params.lr": ("train.lr", t.lr),
        "optimizer.params.betas": ("train.betas", list(t.betas)),
        "optimizer.params.eps": ("train.eps", t.eps),
        "optimizer.params.weight_decay": ("train.weight_decay", t.weight_decay),
        "zero_optimization.stage": ("train.zero_stage", t.zero_stage),
        "zero_optimization.offload_optimizer.device": ("train.offload_optimizer",
                                                       "cpu" if t.offload_optimizer else "none"),
        "zero_optimization.offload_param.device": ("train.offload_params", "cpu" if t.offload_params else "none"),
        "bf16.enabled": ("train.precision", precision == "bf16"),
        "fp16.enabled": ("train.precision", precision == "fp16"),
    }
    impl = adam_impl(recipe)
    if not t.offload_optimizer and impl != "deepspeed_fused":  # offload steps DeepSpeed's CPU Adam
        owned["optimizer.params.torch_adam"] = ("train.kernels.adam", True)
        owned["optimizer.params.fused"] = ("train.kernels.adam", impl == "torch_fused")  # passed on to torch's AdamW
    if zpp.enabled:  # ZeRO++ (arXiv 2306.10209); the recipe check keeps it to ZeRO-3 on GPUs
        owned.update({
            "zero_optimization.zero_quantized_weights": ("quant.zeropp.quantized_weights", zpp.quantized_weights),
            "zero_optimization.zero_quantized_gradients": ("quant.zeropp.quantized_gradients",
                                                           zpp.quantized_gradients),
            "zero_optimization.zero_hpz_partition_size": ("quant.zeropp.hpz_partition_size", zpp.hpz_partition_size)})
    return owned


def leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted key."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(leaves(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_raw(raw: dict, owned: dict[str, tuple[str, Any]]) -> None:
    """Refuse a raw `train.deepspeed` value that contradicts the recipe, naming both."""
    if "scheduler" in raw:
        raise RecipeError(f"train.deepspeed sets a scheduler, but the learning rate's course is the recipe's "
                          f"({SCHEDULE_KEYS}): set those instead")
    for key, value in leaves(raw).items():
        if key in owned:
            recipe_key, wanted = owned[key]
            same = list(value) == wanted if isinstance(value, (list, tuple)) else value == wanted
            if not same:
                raise RecipeError(f"train.deepspeed sets {key}={value!r} but {recipe_key} gives {wanted!r}: "
                                  f"set {recipe_key} instead")


def set_key(config: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def deepspeed_config(recipe: Recipe, precision: str) -> dict[str, Any]:
    """The whole DeepSpeed config; raises RecipeError where train.deepspeed contradicts the recipe (called before
    Ray starts by the driver, and on every worker)."""
    t, s = recipe.train, recipe.scaling
    owned = recipe_owned(recipe, precision)
    if t.deepspeed:
        check_raw(t.deepspeed, owned)
    config: dict[str, Any] = {
        "steps_per_print": 10**9,  # llmray reports progress itself
        "wall_clock_breakdown": False,
        "fp16": {"loss_scale": 0, "initial_scale_power": 12},
    }
    for key, (_, value) in owned.items():
        if key.endswith(".device") and value == "none":
            continue  # no offload: the block is left out
        set_key(config, key, value)
    zero = config["zero_optimization"]
    if t.zero_stage >= 1:
        zero.update(overlap_comm=s.use_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e4)
    for block in ("offload_optimizer", "offload_param"):
        if block in zero:
            zero[block]["pin_memory"] = s.use_gpu
    if t.zero_stage == 0 and precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if t.deepspeed:
        config = deep_merge(config, t.deepspeed)
    return config
