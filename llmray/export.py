"""`llmray export`: a training checkpoint (ZeRO shards of any stage, local or in object storage) into a plain
Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads without llmray: config.json,
model.safetensors (sharded when large), tokenizer files, generation_config.json."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from llmray.config import recipe_from_dict
from llmray.data import storage
from llmray.errors import LlmrayError
from llmray.model import build_config
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


def export(ckpt: str, out: str, dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False) -> dict:
    """Write the Hugging Face folder `out` (whole, or not at all); returns what was written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out_path = Path(out).expanduser().resolve()
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} already exists; choose another --out or pass --overwrite")
    state = checkpoint.verify(ckpt)
    recipe = recipe_from_dict(state["recipe"])
    with local_copy(ckpt) as local:
        tok_dir = Path(local, checkpoint.TOKENIZER_DIR)
        if not tok_dir.is_dir():
            raise ExportError(f"checkpoint {ckpt} holds no tokenizer/ folder (written by an older llmray?)")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        config = build_config(recipe.model, state["vocab_size"])
        weights = consolidated_state_dict(local, recipe.train.zero_stage)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights, strict=True)
    model.to(DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    # Written beside the target and renamed into place: an interrupted export never looks like a finished one.
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        model.save_pretrained(partial, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(partial)
        info = {"checkpoint": ckpt, "step": state["step"], "tokens": state["tokens"], "dtype": dtype,
                "parameters": sum(p.numel() for p in model.parameters()), "zero_stage": recipe.train.zero_stage,
                "world_size": state.get("world_size")}
        Path(partial, EXPORT_INFO).write_text(json.dumps(info, indent=1))
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(partial, out_path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {**info, "out": str(out_path), "files": sorted(p.name for p in out_path.iterdir())}
