"""The DeepSpeed engine a recipe asks for: the model (built partitioned under ZeRO-3, QAT-prepared, with the fast
kernels the recipe resolves to), its DeepSpeed config and LR schedule, and the facts MFU is computed from."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import deepspeed
import torch

from llmray import logs
from llmray.cuda_arch import fix_arch_list
from llmray.model.build import (
    PIXELS_PER_ROW,
    build_config,
    build_model,
    freeze_language_model,
    freeze_tower,
    frozen,
    frozen_dtype,
)
from llmray.model.flops import count_params, flops_per_token
from llmray.model.lora import four_bit, prepare_four_bit, trainable, with_lora
from llmray.prune.sparse import keep_zeros
from llmray.quantize.qat import prepare_qat
from llmray.recipe.schema import SPARSE_METHODS, Recipe
from llmray.train import kernels as fast
from llmray.train.schedule import make_scheduler
from llmray.train.zero import deepspeed_config, resolve_precision

ADAPTER_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}
SHM_ALL_REDUCE_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME


@dataclass(frozen=True)
class ModelFacts:
    n_params: int
    flops_per_token: float
    flat_rows: bool = False  # packed rows go in as one row (flash attention's varlen path; `batch.model_inputs`)
    pixels_per_row: bool = False  # a VLM that takes pixel values per row (`build.PIXELS_PER_ROW`; `batch.model_inputs`)


def device_for(use_gpu: bool) -> torch.device:
    if use_gpu:
        fix_arch_list()  # before DeepSpeed JIT-builds an op for this GPU
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        return dev
    # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce when it sets up its process group: 35 s of g++ on
    # a machine's first run, and a line in each worker's log. Only its inference engine calls it; training never does.
    deepspeed.ops.__compatible_ops__[SHM_ALL_REDUCE_OP] = False
    return torch.device("cpu")


def build_engine(recipe: Recipe, vocab_size: int, device: torch.device, universal: bool, announce: bool):
    """(DeepSpeed engine, ModelFacts). `universal`: the engine will load a checkpoint re-partitioned for this
    world size (DeepSpeed must know at initialize)."""
    t = recipe.train
    precision = resolve_precision(recipe, device.type == "cuda" and torch.cuda.is_bf16_supported())
    ds_config = deepspeed_config(recipe, precision)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    adapters = recipe.trains_adapters
    kernels = fast.resolve(recipe, device.type == "cuda", precision)
    if announce:
        print(f"[llmray] kernels: {kernels.describe()}", flush=True)
    model = model_to_train(recipe, vocab_size, device, precision, ds_config, announce)
    fast.apply(model, kernels, adapters)
    facts = ModelFacts(count_params(model),
                       flops_per_token(model.config, count_params(model, exclude_embeddings=True), recipe.data.seq_len),
                       flat_rows=kernels.flat_rows,
                       pixels_per_row=getattr(model.config, "model_type", None) in PIXELS_PER_ROW)
    with logs.hush_stdout():  # DeepSpeed prints the ops it builds and the kernels it lacks
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=None if "scheduler" in ds_config else make_scheduler(t))
    fast.gather_lm_head_for_liger(engine, kernels, t.zero_stage == 3)
    return engine, facts


def model_to_train(recipe: Recipe, vocab_size: int, device: torch.device, precision: str, ds_config: dict,
                   announce: bool) -> torch.nn.Module:
    """The recipe's model as DeepSpeed is handed it: built (partitioned under ZeRO-3) or loaded (a QLoRA base 4-bit,
    onto `device`), its frozen parts frozen, LoRA-wrapped, with pruned zeros held and QAT's fake quantization."""
    f = recipe.finetune
    if f is not None and f.method == "qlora":  # the base loads 4-bit, onto this rank's device
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        quantized = four_bit(f.qlora, compute, build_config(recipe.model, vocab_size))
        model = prepare_four_bit(build_model(recipe.model, vocab_size, compute, quantized, device))
    else:
        with partitioned_construction(recipe, ds_config):
            model = build_model(recipe.model, vocab_size)
        if announce and builds_partitioned(recipe):
            whole = sum(p.numel() for p in model.parameters())  # a partitioned parameter holds none here
            print(f"[llmray] ZeRO-3: the model was built partitioned ({whole:,} of {count_params(model):,} weights "
                  "held whole by a rank)", flush=True)
    train_tower = recipe.vision is not None and recipe.vision.train_tower
    if recipe.vision is not None and not train_tower:  # before peft: its adapters then skip the tower too
        held = freeze_tower(model)
        if announce:
            print(f"[llmray] vision tower frozen ({held:,} weights; vision.train_tower=true trains it)", flush=True)
    if recipe.vision is not None and not recipe.vision.train_language_model:
        held = freeze_language_model(model)
        if announce:
            print(f"[llmray] language model frozen ({held:,} weights): the projector trains alone", flush=True)
    if recipe.trains_adapters:
        model = with_lora(model, f.lora, train_tower)
        if announce:
            n_train, n_all = trainable(model)
            base = f"a {f.qlora.quant_type} 4-bit base" if f.method == "qlora" else "a frozen base"
            print(f"[llmray] {ADAPTER_NAMES[f.method]} r={f.lora.r} on {base}: "
                  f"{n_train:,} of {n_all:,} parameters train ({100 * n_train / n_all:.2f}%)", flush=True)
    if recipe.prune is not None and recipe.prune.method in SPARSE_METHODS:  # a pruned model's recovery
        held = keep_zeros(model)
        if announce:
            print(f"[llmray] {held:,} pruned weights held at zero while training", flush=True)
    if recipe.quant.method == "qat":  # before DeepSpeed wraps and partitions the parameters
        n_fake = prepare_qat(model, recipe.quant)
        if announce:
            print(f"[llmray] QAT: {n_fake} Linear layers fake-quantized as {recipe.quant.scheme}", flush=True)
    return model


def partitioned_reference(recipe: Recipe, device: torch.device, announce: bool) -> torch.nn.Module | None:
    """Under ZeRO-3, the (preference or RL) reference's frozen copy of model.pretrained partitioned across the ranks as the
    policy is (each holds 1/world of it), in a DeepSpeed engine whose forward gathers each layer as it goes (TRL's
    `prepare_deepspeed` does the same); None elsewhere: the objective holds a whole copy on each rank."""
    if recipe.reference != "copy" or not builds_partitioned(recipe):
        return None
    precision = resolve_precision(recipe, device.type == "cuda" and torch.cuda.is_bf16_supported())
    ds_config = {k: v for k, v in deepspeed_config(recipe, precision).items() if k not in ("optimizer", "scheduler")}
    ds_config["zero_optimization"] = {k: v for k, v in ds_config["zero_optimization"].items()
                                      if not k.startswith("offload_optimizer")}
    with partitioned_construction(recipe, ds_config):
        model = frozen(recipe.model.pretrained, "model.pretrained", device, frozen_dtype(precision))
    with logs.hush_stdout():
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    if announce:
        held = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
        print(f"[llmray] reference: a frozen copy partitioned by ZeRO-3 ({held:,} of "
              f"{count_params(model):,} weights on this rank)", flush=True)
    return engine.eval()


def builds_partitioned(recipe: Recipe) -> bool:
    """ZeRO-3 builds (or loads) the model straight into each rank's partition, so no rank holds it whole; except
    where weights are rewritten between building and DeepSpeed (QAT swaps the Linear layers; a sparse recovery
    reads the zeros it keeps)."""
    sparse = recipe.prune is not None and recipe.prune.method in SPARSE_METHODS
    return recipe.train.zero_stage == 3 and recipe.quant.method != "qat" and not sparse


@contextlib.contextmanager
def partitioned_construction(recipe: Recipe, ds_config: dict):
    """While open, transformers builds a model under `deepspeed.zero.Init` (and loads a pretrained one partition by
    partition, initialising weights as it would whole), as its Trainer does with ZeRO-3."""
    if not builds_partitioned(recipe):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # zero.Init partitions over DeepSpeed's own process group, which `deepspeed.initialize` would set up only later
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    hf_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds only a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # a teacher or an eval model loaded later is whole again
