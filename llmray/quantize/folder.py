"""`llmray quantize`: post-training quantization (torchao) of an exported Hugging Face folder into a folder that
`from_pretrained` and `llmray serve` load (locally or in object storage), with a report of held-out perplexity,
weights on disk and generation tokens/s before and after, measured on the training run's own validation samples."""

from __future__ import annotations

import json
from pathlib import Path

from llmray import storage
from llmray.data.split import HeldOut
from llmray.evals.measure import held_out_samples, side_by_side
from llmray.model import lineage
from llmray.model.build import inference_device, load_for_inference
from llmray.outdir import free_target, staged
from llmray.quantize.schemes import QuantError, check_scheme, torchao_hf_config

REPORT_FILE = "quant_report.json"


def quantize_folder(src: str, out: str, quant, held_out: HeldOut | None = None, eval_samples: int = 64,
                    overwrite: bool = False, device: str | None = None, method: str = "ptq") -> dict:
    """Quantize the Hugging Face model `src` (a folder, local or s3://, or a Hub id) into `out` (whole, or not at
    all) as the QuantSettings `quant` says, and measure both on the same held-out samples. Returns the report, also
    saved as `out/quant_report.json`."""
    from transformers import AutoConfig, AutoTokenizer

    dev = inference_device(device)
    check_scheme(quant.scheme, dev.type == "cuda")
    src = storage.local_folder(src, "the model to quantize")  # a Hub id or s3:// folder, downloaded once
    if not Path(src, "config.json").is_file():
        raise QuantError(f"{src} is not a Hugging Face model folder (no config.json); export a checkpoint first")
    if getattr(AutoConfig.from_pretrained(src), "quantization_config", None):
        raise QuantError(f"{src} is already quantized; quantize the full-precision export")
    target = free_target(out, overwrite)
    held_out = held_out or lineage.recorded_held_out(src)
    if held_out is None:
        raise QuantError(f"{src} names no held-out set to measure perplexity on; pass --eval-data SHARD_FOLDER")
    samples = held_out_samples(held_out, src, eval_samples)
    with staged(target) as partial:
        model = load_for_inference(src, dev, torchao_hf_config(quant))
        model.save_pretrained(partial, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(partial)
        lineage.carry(src, partial, "quant", {"method": method, "scheme": quant.scheme, "group_size": quant.group_size,
                                              "skip": quant.skip})
        del model
        # Measured: the source, and what was written, loaded back as users will load it.
        before, after = side_by_side([src, str(partial)], samples, dev)
        report = {
            "action": f"{method} {quant.scheme}", "report": f"{target}/{REPORT_FILE}",
            "method": method, "scheme": quant.scheme, "group_size": quant.group_size if "int4" in quant.scheme else None,
            "skip": quant.skip, "source": str(Path(src).resolve()), "out": target, "device": str(dev),
            "input_report": lineage.input_report(src),
            "held_out": {"what": held_out.describe(), "samples": len(samples), "tokens": before["tokens"]},
            "before": before, "after": after,
            "ppl_delta": after["ppl"] - before["ppl"], "ppl_ratio": after["ppl"] / before["ppl"],
            "size_ratio": after["weights_bytes"] / before["weights_bytes"],
            "speed_ratio": after["tokens_per_s"] / before["tokens_per_s"],
            "versions": _versions(),
        }
        Path(partial, REPORT_FILE).write_text(json.dumps(report, indent=1))
        report["files"] = sorted(p.name for p in Path(partial).iterdir())
    return report


def _versions() -> dict:
    import torch
    import torchao
    import transformers

    return {"torch": torch.__version__, "torchao": torchao.__version__, "transformers": transformers.__version__}
