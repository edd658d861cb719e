"""`llmray quantize`: post-training quantization (torchao) of an exported Hugging Face folder into a folder that
`from_pretrained` and `llmray serve` load (locally or in object storage), with a report of held-out perplexity,
weights on disk and generation tokens/s before and after, measured on the training run's own validation samples."""

from __future__ import annotations

import json
from pathlib import Path

from llmray import lineage
from llmray.data.split import HeldOut
from llmray.eval import generation_speeds, held_out_samples, perplexity, weights_bytes
from llmray.model import inference_device, load_for_inference
from llmray.outdir import free_target, staged
from llmray.quant import QuantError, check_scheme, torchao_hf_config

REPORT_FILE = "quant_report.json"


def quantize_folder(src: str, out: str, quant, held_out: HeldOut | None = None, eval_samples: int = 64,
                    overwrite: bool = False, device: str | None = None, method: str = "ptq") -> dict:
    """Quantize the Hugging Face folder `src` into `out` (whole, or not at all) as the QuantConfig `quant` says,
    and measure both on the same held-out samples. Returns the report, also saved as `out/quant_report.json`."""
    from transformers import AutoConfig, AutoTokenizer

    dev = inference_device(device)
    check_scheme(quant.scheme, dev.type == "cuda")
    if not Path(src, "config.json").is_file():
        raise QuantError(f"{src} is not a Hugging Face model folder (no config.json); export a checkpoint first")
    if getattr(AutoConfig.from_pretrained(src), "quantization_config", None):
        raise QuantError(f"{src} is already quantized; quantize the full-precision export")
    target = free_target(out, overwrite)
    held_out = held_out or lineage.held_out(src)
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
        models = [load_for_inference(src, dev), load_for_inference(str(partial), dev)]
        before, after = ({**perplexity(m, samples), "weights_bytes": weights_bytes(folder)}
                         for m, folder in zip(models, (src, partial)))
        for figures, speed in zip((before, after), generation_speeds(models, samples)):
            figures.update(speed)
        del models
        report = {
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


def report_text(r: dict) -> str:
    b, a = r["before"], r["after"]
    return "\n".join([
        f"{r['method']} {r['scheme']} on {r['device']}, measured on {r['held_out']['tokens']:,} held-out tokens "
        f"({r['held_out']['what']}):",
        f"  perplexity  {b['ppl']:10.3f} -> {a['ppl']:10.3f}   ({r['ppl_delta']:+.3f}, x{r['ppl_ratio']:.4f})",
        f"  weights     {b['weights_bytes'] / 1e6:9.2f}M -> {a['weights_bytes'] / 1e6:9.2f}M  (x{r['size_ratio']:.3f})",
        f"  tokens/s    {b['tokens_per_s']:10.1f} -> {a['tokens_per_s']:10.1f}   (x{r['speed_ratio']:.3f}, greedy, "
        f"batch 1, {a['threads']} threads)",
        f"  report: {r['out']}/{REPORT_FILE}",
    ])
