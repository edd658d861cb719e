"""`llmray export`: a training checkpoint (ZeRO shards of any stage, local or in object storage) into a plain
Hugging Face folder that `AutoModelForCausalLM.from_pretrained` (a vision-language model's:
`AutoModelForImageTextToText` and `AutoProcessor`) loads without llmray: config.json,
model.safetensors (sharded when large), tokenizer files, generation_config.json, and its lineage. The folder may
be local or in object storage (s3://, gs://); either way it is written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from llmray import hub, logs, storage
from llmray.data.split import HeldOut
from llmray.errors import LlmrayError
from llmray.model import lineage
from llmray.model.build import build_config, model_class, pretrained_folder
from llmray.model.lora import with_lora
from llmray.outdir import free_target, staged
from llmray.quantize.folder import quantize_folder
from llmray.recipe.load import recipe_from_dict
from llmray.train import checkpoint
from llmray.train.safe_load import weights_only_loads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(LlmrayError):
    pass


@contextmanager
def local_copy(uri: str):
    """The checkpoint as a local folder: itself when local, else a temporary download."""
    if not storage.is_uri(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="llmray-export-") as tmp:
        yield storage.download(uri, tmp)


def consolidated_state_dict(directory: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights: gathered from every rank's ZeRO partitions, or the whole module under ZeRO-0."""
    with weights_only_loads():
        if zero_stage == 0:
            states = torch.load(Path(directory, checkpoint.TAG, "mp_rank_00_model_states.pt"), map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # else it warns
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(directory, tag=checkpoint.TAG)


def full_precision_base(recipe, ckpt: str):
    """The folder a QLoRA run quantized to 4 bits as it loaded: its adapters are merged into (or named with) the
    full-precision weights, as QLoRA exports do."""
    base = storage.local_folder(recipe.model.pretrained, "model.pretrained")  # a Hub id: the commit it trained on
    if not Path(base, "config.json").is_file():
        raise ExportError(f"checkpoint {ckpt} trained QLoRA adapters over model.pretrained {recipe.model.pretrained}, "
                          "whose full-precision weights the export merges them into; that folder is not there")
    return model_class(build_config(recipe.model, 0)).from_pretrained(base, dtype=torch.float32)


def _pretrained_lineage(name: str | None) -> dict | None:
    """The lineage of the model a run started from, when it has one (and is still there)."""
    if name is None:
        return None
    try:
        return lineage.read(pretrained_folder(name, config_only=True))
    except LlmrayError:
        return {}


def load_adapters(model, weights: dict[str, torch.Tensor], ckpt: str) -> None:
    """The checkpoint's LoRA weights into `model`'s adapters, every one of them, and what trained in full beside
    them (peft's modules_to_save: a vision-language model's projector); the 4-bit base in the checkpoint is left: the
    full-precision base replaces it."""
    trained = ("lora_", ".modules_to_save.")
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if any(t in k for t in trained)},
                                                strict=False)
    missing = [k for k in missing if any(t in k for t in trained)]
    if missing or unexpected:
        raise ExportError(f"checkpoint {ckpt}: its LoRA weights do not fit the recipe's adapters "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def export(ckpt: str, out: str, dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False,
           full_precision: bool = False, adapter: bool = False) -> dict:
    """Write the Hugging Face folder `out` (whole, or not at all); returns what was written. A run whose recipe
    asks for quantization (quant.method qat or ptq) is exported quantized, with its report, unless
    `full_precision`. A LoRA fine-tune is exported with its adapters merged into the base weights, or with
    `adapter` as the PEFT adapter folder alone (`PeftModel.from_pretrained(base, out)`). `ckpt` may also be a
    run folder: its latest complete checkpoint is exported."""
    from transformers import AutoTokenizer, GenerationConfig

    from llmray.data.pixels import load_processor

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = free_target(out, overwrite)
    in_run = checkpoint.list_checkpoints(ckpt)  # a run folder: its latest complete checkpoint
    ckpt = in_run[-1][1] if in_run else ckpt
    state = checkpoint.verify(ckpt)
    recipe = recipe_from_dict(state.recipe)
    quantize = recipe.quant.method != "none" and not full_precision
    with local_copy(ckpt) as local:
        tok_dir = Path(local, checkpoint.TOKENIZER_DIR)
        if not tok_dir.is_dir():
            raise ExportError(f"checkpoint {ckpt} holds no tokenizer/ folder (written by an older llmray?)")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        # a vision-language run's checkpoint holds the processor (image processor and tokenizer): exported whole
        processor = load_processor(str(tok_dir)) if recipe.vision is not None else None
        config = build_config(recipe.model, state.vocab_size)
        with logs.hush_stdout():  # DeepSpeed prints each step of gathering the ZeRO partitions
            weights = consolidated_state_dict(local, recipe.train.zero_stage)
    lora = recipe.trains_adapters
    train_tower = recipe.vision is not None and recipe.vision.train_tower
    if adapter and not lora:
        raise ExportError(f"--adapter: checkpoint {ckpt} is not a LoRA fine-tune (its recipe has "
                          f"finetune.method={recipe.finetune.method if recipe.finetune else 'none'})")
    # QAT's fake-quantized layers keep nn.Linear's parameters, so their weights load into the plain model as they
    # are; quantizing that model with the same scheme is torchao's QAT "convert" step.
    if lora and recipe.finetune.method == "qlora":
        model = with_lora(full_precision_base(recipe, ckpt), recipe.finetune.lora, train_tower)
        load_adapters(model, weights, ckpt)
    else:
        model = model_class(config).from_config(config)
        if lora:  # the engine trained the peft-wrapped model: its state dict loads into the same wrapping
            model = with_lora(model, recipe.finetune.lora, train_tower)
        model.load_state_dict(weights, strict=True)
    if lora:  # what PeftModel.from_pretrained loads the adapter onto: a folder, or a Hub id and its commit
        base = recipe.model.pretrained
        if hub.is_hub_id(base):
            base, model.peft_config["default"].revision = hub.split_id(base)
        model.peft_config["default"].base_model_name_or_path = base
    if lora and not adapter:
        model = model.merge_and_unload()
    model.to(DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    info = lineage.record_export(
        HeldOut.of_recipe(recipe), checkpoint=ckpt, step=state.step, tokens=state.tokens, dtype=dtype,
        parameters=sum(p.numel() for p in model.parameters()), zero_stage=recipe.train.zero_stage,
        world_size=state.world_size, finetune=recipe.finetune.method if recipe.finetune else None,
        adapter_only=adapter, figures=lineage.figures(state.history),
        recipe=state.recipe,  # what trained it: `llmray prune --recover-steps` retrains on it
        pretrained_lineage=_pretrained_lineage(recipe.model.pretrained))

    def write(folder: Path) -> list[str]:
        if adapter:  # adapter_config.json and adapter_model.safetensors, naming the base folder
            model.save_pretrained(folder, safe_serialization=True)
        else:
            model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
        (processor or tokenizer).save_pretrained(folder)
        lineage.write(folder, info)
        return sorted(p.name for p in folder.iterdir())

    if not quantize or adapter:  # an adapter is quantized with its base, once merged
        with staged(target) as partial:
            files = write(partial)
        return {**info, "out": target, "files": files}
    with tempfile.TemporaryDirectory(prefix="llmray-full-precision-") as full:
        write(Path(full))
        report = quantize_folder(full, target, recipe.quant, overwrite=overwrite, method=recipe.quant.method)
    return {**info, "out": target, "files": report["files"], "quant_report": report}
