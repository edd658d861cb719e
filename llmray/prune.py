"""`llmray prune`: a smaller or sparser copy of an exported Hugging Face folder, measured like `llmray quantize`.

- depth (structured): drop the decoder layers that change the hidden state least on the held-out text (block
  influence, 1 - cos(h_in, h_out), as ShortGPT and Minitron rank them). The result is a genuinely smaller model:
  fewer layers in config.json, which plain transformers loads and which runs faster anywhere.
- magnitude / wanda (unstructured): zero the smallest weights of every decoder Linear layer, by |W| or by
  |W| * ||x|| (Wanda: the weight times its input's activation norm on the held-out text), per output row, at
  `sparsity`, or `pattern` N:M (N kept in every M consecutive inputs, 2:4 being what sparse tensor cores run). The
  zeros are stored densely: the folder is not smaller and, without sparse kernels (none here on CPU), not faster.

Calibration and measurement use the held-out set the export recorded (llmray_export.json). The report gives
held-out perplexity, parameters and the share of non-zero decoder weights, bytes on disk and tokens/s, before and
after; `prune_report.json` names its input's report, so a folder states its lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmray import lineage
from llmray.errors import LlmrayError
from llmray.eval import generation_speeds, held_out_samples, perplexity, weights_bytes
from llmray.model import inference_device, load_for_inference
from llmray.outdir import free_target, staged

METHODS = ("depth", "magnitude", "wanda")
REPORT_FILE = "prune_report.json"
CALIBRATION_BATCH = 8


class PruneError(LlmrayError):
    """Arguments or a folder `llmray prune` cannot take; the message names the argument."""


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    if pattern is None:
        return None
    n, sep, m = pattern.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise PruneError(f"--pattern {pattern!r} is not N:M with 0 < N < M, e.g. 2:4")
    return int(n), int(m)


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside the decoder blocks (embeddings and the LM head stay dense)."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{name}"}


def check_arguments(model, method: str, sparsity: float | None, pattern: tuple[int, int] | None,
                    drop_layers: int | None) -> None:
    """Everything refused before anything is written, each in one line naming the argument."""
    if method not in METHODS:
        raise PruneError(f"--method {method!r} is not one of {', '.join(METHODS)} (width pruning is not built yet)")
    layers = model.config.num_hidden_layers
    if method == "depth":
        if drop_layers is None or not 0 < drop_layers < layers:
            raise PruneError(f"--drop-layers must be between 1 and {layers - 1} (the model has {layers} layers); "
                             f"got {drop_layers}")
        return
    if (sparsity is None) == (pattern is None):
        raise PruneError(f"--method {method} takes --sparsity S (0 < S < 1) or --pattern N:M, one of them")
    if sparsity is not None and not 0 < sparsity < 1:
        raise PruneError(f"--sparsity must be in (0, 1); got {sparsity}")
    if pattern is not None:
        for name, linear in decoder_linears(model).items():
            if linear.in_features % pattern[1]:
                raise PruneError(f"--pattern {pattern[0]}:{pattern[1]}: {pattern[1]} does not divide the "
                                 f"{linear.in_features} inputs of {name}")


@torch.no_grad()
def block_influence(model, samples) -> list[float]:
    """Per decoder layer: 1 - mean cosine similarity between its input and output hidden states."""
    device, scores = next(model.parameters()).device, None
    for start in range(0, len(samples), CALIBRATION_BATCH):
        ids = torch.as_tensor(samples[start:start + CALIBRATION_BATCH], dtype=torch.long, device=device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum().item()
               for a, b in zip(hidden[:-1], hidden[1:])]
        scores = cos if scores is None else [s + c for s, c in zip(scores, cos)]
    tokens = len(samples) * len(samples[0])
    return [1.0 - s / tokens for s in scores]


def drop_layers_of(model, drop: list[int]) -> None:
    """Remove decoder layers `drop` in place; config.json then says the new depth."""
    keep = [i for i in range(model.config.num_hidden_layers) if i not in drop]
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):  # attention layers know their index (for KV caches)
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        model.config.layer_types = [types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)


@torch.no_grad()
def input_norms(model, samples, linears: dict) -> dict[str, torch.Tensor]:
    """||x_j||_2 over the held-out tokens, per input channel j of each Linear layer (Wanda's activation term)."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def record(name: str):
        def hook(module, args, output) -> None:  # returns None: a forward hook's return value replaces the output
            x = args[0].detach().float()
            sums[name].add_(x.reshape(-1, x.shape[-1]).pow(2).sum(0).double().cpu())
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(samples), CALIBRATION_BATCH):
            model(input_ids=torch.as_tensor(samples[start:start + CALIBRATION_BATCH], dtype=torch.long, device=device))
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


@torch.no_grad()
def prune_weights(linears: dict, sparsity: float | None, pattern: tuple[int, int] | None,
                  norms: dict[str, torch.Tensor] | None = None) -> None:
    """Zero, in place, the lowest-scoring weights of each output row (score |W|, or |W| * ||x|| with `norms`):
    a `sparsity` share of the row, or all but N of every M consecutive inputs."""
    for name, linear in linears.items():
        w = linear.weight
        score = w.abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device)[None, :]
        if pattern is not None:
            n, m = pattern
            groups = score.reshape(w.shape[0], -1, m)
            drop = groups.topk(m - n, dim=-1, largest=False).indices
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
        else:
            k = int(w.shape[1] * sparsity)
            drop = score.topk(k, dim=1, largest=False).indices
            mask = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
        w.mul_(mask.to(w.dtype))


def nonzero_share(model) -> float:
    linears = decoder_linears(model).values()
    return sum(int(m.weight.count_nonzero()) for m in linears) / sum(m.weight.numel() for m in linears)


def prune_folder(src: str, out: str, method: str, sparsity: float | None = None, pattern: str | None = None,
                 drop_layers: int | None = None, eval_samples: int = 64, overwrite: bool = False,
                 device: str | None = None) -> dict:
    """Prune the Hugging Face folder `src` into `out` (whole, or not at all); returns the report, also saved as
    `out/prune_report.json`."""
    from transformers import AutoTokenizer

    if not Path(src, "config.json").is_file():
        raise PruneError(f"{src} is not a Hugging Face model folder (no config.json); export a checkpoint first")
    dev = inference_device(device)
    nm = parse_pattern(pattern)
    model = load_for_inference(src, dev)
    check_arguments(model, method, sparsity, nm, drop_layers)
    target = free_target(out, overwrite)
    held_out = lineage.held_out(src)
    if held_out is None:
        raise PruneError(f"{src} names no held-out set (llmray_export.json) to calibrate and measure on; "
                         "prune a folder written by `llmray export`")
    samples = held_out_samples(held_out, src, eval_samples)
    params_before, share_before = sum(p.numel() for p in model.parameters()), nonzero_share(model)
    details: dict = {}
    if method == "depth":
        influence = block_influence(model, samples)
        dropped = sorted(sorted(range(len(influence)), key=influence.__getitem__)[:drop_layers])
        drop_layers_of(model, dropped)
        details = {"block_influence": influence, "dropped_layers": dropped}
    else:
        linears = decoder_linears(model)
        norms = input_norms(model, samples, linears) if method == "wanda" else None
        prune_weights(linears, sparsity, nm, norms)
        details = {"sparsity": sparsity, "pattern": pattern}
    with staged(target) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(partial)
        lineage.carry(src, partial, "prune", {"method": method, **details})
        del model
        models = [load_for_inference(src, dev), load_for_inference(str(partial), dev)]
        before, after = ({**perplexity(m, samples), "weights_bytes": weights_bytes(folder),
                          "parameters": sum(p.numel() for p in m.parameters()), "nonzero_share": nonzero_share(m)}
                         for m, folder in zip(models, (src, partial)))
        for figures, speed in zip((before, after), generation_speeds(models, samples)):
            figures.update(speed)
        del models
        report = {
            "method": method, **details, "source": str(Path(src).resolve()), "out": target, "device": str(dev),
            "input_report": lineage.input_report(src), "held_out": {"what": held_out.describe(), "samples": len(samples)},
            "before": before, "after": after, "ppl_ratio": after["ppl"] / before["ppl"],
            "parameter_ratio": after["parameters"] / params_before,
            "size_ratio": after["weights_bytes"] / before["weights_bytes"],
            "speed_ratio": after["tokens_per_s"] / before["tokens_per_s"], "nonzero_before": share_before,
        }
        Path(partial, REPORT_FILE).write_text(json.dumps(report, indent=1))
        report["files"] = sorted(p.name for p in Path(partial).iterdir())
    return report


def report_text(r: dict) -> str:
    b, a = r["before"], r["after"]
    what = f"dropped layers {r['dropped_layers']}" if r["method"] == "depth" else \
        f"pattern {r['pattern']}" if r.get("pattern") else f"sparsity {r['sparsity']}"
    return "\n".join([
        f"{r['method']} pruning ({what}) on {r['device']}, measured on {r['held_out']['what']}:",
        f"  perplexity   {b['ppl']:10.3f} -> {a['ppl']:10.3f}   (x{r['ppl_ratio']:.4f})",
        f"  parameters   {b['parameters'] / 1e6:9.2f}M -> {a['parameters'] / 1e6:9.2f}M  (x{r['parameter_ratio']:.3f})",
        f"  non-zero     {100 * b['nonzero_share']:9.1f}% -> {100 * a['nonzero_share']:9.1f}%  (decoder Linear weights)",
        f"  weights      {b['weights_bytes'] / 1e6:9.2f}M -> {a['weights_bytes'] / 1e6:9.2f}M  (x{r['size_ratio']:.3f})",
        f"  tokens/s     {b['tokens_per_s']:10.1f} -> {a['tokens_per_s']:10.1f}   (x{r['speed_ratio']:.3f}, greedy, batch 1)",
        f"  report: {r['out']}/{REPORT_FILE}",
    ])
