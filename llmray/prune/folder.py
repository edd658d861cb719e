"""`llmray prune`: a smaller or sparser copy of an exported Hugging Face folder, measured like `llmray quantize`.

- depth, width (structured): fewer layers, or narrower layers (MLP channels, attention heads, hidden size). The
  result is a genuinely smaller model that plain transformers loads and that runs faster anywhere.
- magnitude, wanda (unstructured, or N:M): zeros in every decoder Linear layer, stored densely; the folder is
  neither smaller nor, without sparse kernels (none on CPU), faster.

Calibration and measurement use the held-out set the export recorded (llmray_export.json). `prune_report.json`
gives held-out perplexity, parameters, the share of non-zero decoder weights, bytes on disk and tokens/s before and
after, and names its input's report, so a folder states its lineage. Recovery training (`--recover-steps`) is in
`recover.py`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llmray import storage
from llmray.errors import LlmrayError
from llmray.evals.measure import held_out_samples, side_by_side
from llmray.model import lineage
from llmray.model.build import inference_device, load_for_inference
from llmray.outdir import free_target, staged
from llmray.prune import depth, sparse, width
from llmray.recipe.schema import PruneSettings

REPORT_FILE = "prune_report.json"
METHOD_KEYS = {"depth": ("drop_layers",), "width": ("hidden_size", "intermediate_size", "heads"),
               "magnitude": ("sparsity", "pattern"), "wanda": ("sparsity", "pattern")}


class PruneError(LlmrayError):
    """Arguments or a folder `llmray prune` cannot take; the message names the argument."""


def cli_flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def recipe_key(key: str) -> str:
    return f"prune.{key}"


def parse_pattern(pattern: str | None, flag: Callable[[str], str] = cli_flag) -> tuple[int, int] | None:
    if pattern is None:
        return None
    n, sep, m = pattern.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise PruneError(f"{flag('pattern')} {pattern!r} is not N:M with 0 < N < M, e.g. 2:4")
    return int(n), int(m)


def width_target(model, spec: PruneSettings, flag: Callable[[str], str]) -> width.WidthShape:
    why = width.unsupported_layout(model)
    if why:
        raise PruneError(f"{flag('method')} width handles Llama-style decoders only: {why}")
    now = width.shape_of(model)
    asked = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size, "heads": spec.heads}
    if all(v is None for v in asked.values()):
        raise PruneError(f"{flag('method')} width takes {', '.join(flag(k) for k in asked)}: at least one")
    for key, value in asked.items():
        current = getattr(now, key)
        if value is not None and not 0 < value <= current:
            raise PruneError(f"{flag(key)} must be between 1 and the model's {current}; got {value}")
    heads = spec.heads or now.heads
    if heads % now.group:
        raise PruneError(f"{flag('heads')} {heads}: the model's {now.heads} query heads share {now.kv_heads} key/value "
                         f"heads in groups of {now.group}, which go whole; ask for a multiple of {now.group}")
    target = width.WidthShape(spec.hidden_size or now.hidden_size, spec.intermediate_size or now.intermediate_size,
                              heads, heads // now.group, now.head_dim)
    if target == now:
        raise PruneError(f"{', '.join(flag(k) for k in asked)}: the targets are the model's own widths; nothing to prune")
    return target


def check_spec(model, spec: PruneSettings, flag: Callable[[str], str] = cli_flag) -> width.WidthShape | None:
    """Everything refused before anything is written, each in one line naming the argument. Returns the width
    target for width pruning."""
    stray = [k for keys in METHOD_KEYS.values() for k in keys
             if k not in METHOD_KEYS[spec.method] and getattr(spec, k) is not None]
    if stray:
        raise PruneError(f"{flag(stray[0])} does not apply to {flag('method')} {spec.method} "
                         f"(it takes {', '.join(flag(k) for k in METHOD_KEYS[spec.method])})")
    if spec.method == "depth":
        layers = model.config.num_hidden_layers
        if spec.drop_layers is None or not 0 < spec.drop_layers < layers:
            raise PruneError(f"{flag('drop_layers')} must be between 1 and {layers - 1} (the model has {layers} "
                             f"layers); got {spec.drop_layers}")
        return None
    if spec.method == "width":
        return width_target(model, spec, flag)
    if (spec.sparsity is None) == (spec.pattern is None):
        raise PruneError(f"{flag('method')} {spec.method} takes {flag('sparsity')} S (0 < S < 1) or "
                         f"{flag('pattern')} N:M, one of them")
    if spec.sparsity is not None and not 0 < spec.sparsity < 1:
        raise PruneError(f"{flag('sparsity')} must be in (0, 1); got {spec.sparsity}")
    pattern = parse_pattern(spec.pattern, flag)
    if pattern is not None:
        for name, linear in sparse.decoder_linears(model).items():
            if linear.in_features % pattern[1]:
                raise PruneError(f"{flag('pattern')} {spec.pattern}: {pattern[1]} does not divide the "
                                 f"{linear.in_features} inputs of {name}")
    return None


def apply(model, spec: PruneSettings, samples, target: width.WidthShape | None) -> dict:
    """Prune `model` in place as `spec` says; returns the details the report and lineage keep."""
    if spec.method == "depth":
        influence = depth.block_influence(model, samples)
        dropped = depth.least_influential(influence, spec.drop_layers)
        depth.drop_layers_of(model, dropped)
        return {"block_influence": influence, "dropped_layers": dropped}
    if spec.method == "width":
        kept = width.shrink(model, width.importance(model, samples), target)
        return {"width": {k: getattr(target, k) for k in ("hidden_size", "intermediate_size", "heads", "kv_heads")},
                **kept}
    linears = sparse.decoder_linears(model)
    norms = sparse.input_norms(model, samples, linears) if spec.method == "wanda" else None
    sparse.prune_weights(linears, spec.sparsity, parse_pattern(spec.pattern), norms)
    return {"sparsity": spec.sparsity, "pattern": spec.pattern}


def calibration(src: str, spec: PruneSettings):
    held_out = lineage.recorded_held_out(src)
    if held_out is None:
        raise PruneError(f"{src} names no held-out set (llmray_export.json) to calibrate and measure on; "
                         "prune a folder written by `llmray export`")
    return held_out, held_out_samples(held_out, src, spec.calibration_samples)


def measure(folders: list[str], samples, dev) -> list[dict]:
    """Held-out perplexity, size, non-zero share and greedy tokens/s of each folder, the models timed in turns."""
    return side_by_side(folders, samples, dev, lambda m: {"parameters": sum(p.numel() for p in m.parameters()),
                                                          "nonzero_share": sparse.nonzero_share(m)})


def ratios(before: dict, after: dict) -> dict:
    return {"ppl_ratio": after["ppl"] / before["ppl"], "parameter_ratio": after["parameters"] / before["parameters"],
            "size_ratio": after["weights_bytes"] / before["weights_bytes"],
            "speed_ratio": after["tokens_per_s"] / before["tokens_per_s"]}


def prune_folder(src: str, out: str, spec: PruneSettings, overwrite: bool = False, device: str | None = None,
                 flag: Callable[[str], str] = cli_flag) -> dict:
    """Prune the Hugging Face model `src` (a folder, local or s3://, or a Hub id) into `out` (whole, or not at
    all); returns the report, also saved as `out/prune_report.json`."""
    from transformers import AutoTokenizer

    src = storage.local_folder(src, "the model to prune")  # a Hub id or s3:// folder, downloaded once
    if not Path(src, "config.json").is_file():
        raise PruneError(f"{src} is not a Hugging Face model folder (no config.json); export a checkpoint first")
    dev = inference_device(device)
    model = load_for_inference(src, dev)
    target = check_spec(model, spec, flag)
    out = free_target(out, overwrite)
    held_out, samples = calibration(src, spec)
    details = apply(model, spec, samples, target)
    with staged(out) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(partial)
        lineage.carry(src, partial, "prune", {"method": spec.method, "spec": spec.model_dump(),
                                              "source": str(Path(src).resolve()), **details})
        del model
        before, after = measure([src, str(partial)], samples, dev)
        report = {
            "action": f"{spec.method} pruning ({what_was_done(spec.method, details)})", "report": f"{out}/{REPORT_FILE}",
            "method": spec.method, **details, "source": str(Path(src).resolve()), "out": out, "device": str(dev),
            "input_report": lineage.input_report(src), "held_out": {"what": held_out.describe(), "samples": len(samples)},
            "before": before, "after": after, **ratios(before, after),
        }
        Path(partial, REPORT_FILE).write_text(json.dumps(report, indent=1))
        report["files"] = sorted(p.name for p in Path(partial).iterdir())
    return report


def what_was_done(method: str, details: dict) -> str:
    """The pruning `apply` did, in a few words, from the details it returned."""
    if method == "depth":
        return f"dropped layers {details['dropped_layers']}"
    if method == "width":
        return ", ".join(f"{k} {v}" for k, v in details["width"].items())
    return f"pattern {details['pattern']}" if details.get("pattern") else f"sparsity {details['sparsity']}"
