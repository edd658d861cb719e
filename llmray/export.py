"""`llmray export`: a training checkpoint (ZeRO shards of any stage, local or in object storage) into a plain
Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads without llmray: config.json,
model.safetensors (sharded when large), tokenizer files, generation_config.json."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from llmray.config import recipe_from_dict
from llmray.data import storage
from llmray.errors import LlmrayError
from llmray.model import build_config
from llmray.outdir import free_target, staged
from llmray.train import checkpoint
from llmray.train.safe_load import weights_only_loads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_INFO = "llmray_export.json"


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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(directory, tag=checkpoint.TAG)


def held_out_info(recipe) -> dict:
    """The run's validation split as `eval.HeldOut` fields, so `llmray quantize` on this export measures on the
    same held-out text."""
    from dataclasses import asdict

    from llmray.eval import HeldOut

    d = recipe.data
    if not (d.val_shards or d.val_fraction > 0):
        return {}
    shards, fraction = (d.val_shards, 0.0) if d.val_shards else (d.shards, d.val_fraction)
    return asdict(HeldOut(shards, fraction, d.seq_len, recipe.run.seed))


def export(ckpt: str, out: str, dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False,
           full_precision: bool = False) -> dict:
    """Write the Hugging Face folder `out` (whole, or not at all); returns what was written. A run whose recipe
    asks for quantization (quant.method qat or ptq) is exported quantized, with its report, unless
    `full_precision`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out_path = free_target(out, overwrite)
    state = checkpoint.verify(ckpt)
    recipe = recipe_from_dict(state["recipe"])
    quantize = recipe.quant.method != "none" and not full_precision
    with local_copy(ckpt) as local:
        tok_dir = Path(local, checkpoint.TOKENIZER_DIR)
        if not tok_dir.is_dir():
            raise ExportError(f"checkpoint {ckpt} holds no tokenizer/ folder (written by an older llmray?)")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        config = build_config(recipe.model, state["vocab_size"])
        weights = consolidated_state_dict(local, recipe.train.zero_stage)
    # QAT's fake-quantized layers keep nn.Linear's parameters, so their weights load into the plain model as they
    # are; quantizing that model with the same scheme is torchao's QAT "convert" step.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights, strict=True)
    model.to(DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    info = {"checkpoint": ckpt, "step": state["step"], "tokens": state["tokens"], "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()), "zero_stage": recipe.train.zero_stage,
            "world_size": state.get("world_size"), "held_out": held_out_info(recipe)}
    full = out_path.with_name(f".{out_path.name}.full-precision") if quantize else out_path
    with staged(full) as partial:
        model.save_pretrained(partial, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(partial)
        Path(partial, EXPORT_INFO).write_text(json.dumps(info, indent=1))
    result = {**info, "out": str(out_path)}
    if quantize:
        from llmray.quant import quantize_folder

        try:
            result["quant_report"] = quantize_folder(str(full), str(out_path), recipe.quant, overwrite=overwrite,
                                                     method=recipe.quant.method)
        finally:
            shutil.rmtree(full, ignore_errors=True)
    return {**result, "files": sorted(p.name for p in out_path.iterdir())}
