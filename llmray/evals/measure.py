"""Measuring model folders side by side, without Ray, for the quantize and prune reports: held-out samples to
measure perplexity on (`perplexity.held_out_perplexity`), generation speed, weights on disk, and the before/after
table the reports print.

The held-out samples are the same a training run validates on (`data.split` says which documents, and
`pack.first_samples` packs them in the stream's order, without Ray).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from llmray.data.pack import StreamSpec, first_samples
from llmray.data.split import HeldOut
from llmray.errors import LlmrayError
from llmray.evals.perplexity import held_out_perplexity, model_device
from llmray.recipe.schema import default


class EvalError(LlmrayError):
    pass


def held_out_samples(held_out: HeldOut, tokenizer_dir: str, max_samples: int) -> np.ndarray:
    """Up to `max_samples` packed rows of `seq_len` tokens: the first validation samples of the run that
    `held_out` describes, the same ones it validated on."""
    spec = StreamSpec.of([("held-out", 1.0, held_out.documents)], tokenizer_dir, held_out.seq_len, held_out.seed,
                         batch_docs=default("data", "tokenize_batch_docs"))
    samples = first_samples(spec, max_samples)
    if not len(samples):
        raise EvalError(f"{held_out.describe()} holds fewer than {held_out.seq_len} tokens: nothing to measure on")
    return samples


# The greedy decoding a report's tokens/s is timed on: prompts, new tokens each, rounds. LLMRAY_QUICK_SPEED=1 (the
# test suite sets it) times one short answer once: the figure is then a smoke check; timing is benchmarks' job.
SPEED_RUN = {"prompts": 4, "new_tokens": 64, "rounds": 3}
QUICK_SPEED_RUN = {"prompts": 1, "new_tokens": 8, "rounds": 1}


@torch.inference_mode()
def generation_speeds(models: list[torch.nn.Module], samples: np.ndarray, prompt_tokens: int = 32) -> list[dict]:
    """Greedy decoding, one prompt at a time (the latency a single user sees), every answer `new_tokens` long.
    The models take turns, `rounds` times, after one untimed warm-up each, and each keeps its best round: on a
    shared machine, turns and best-of keep load spikes from deciding the ratio."""
    run_size = QUICK_SPEED_RUN if os.environ.get("LLMRAY_QUICK_SPEED") == "1" else SPEED_RUN
    prompts, new_tokens, rounds = run_size["prompts"], run_size["new_tokens"], run_size["rounds"]
    heads = [torch.from_numpy(s[:prompt_tokens].astype(np.int64))[None] for s in samples[:prompts]]

    def run(model, ids):
        pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id or 0
        ids = ids.to(model_device(model))
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    def timed(model) -> float:
        cuda = model_device(model).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for ids in heads:
            run(model, ids)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for model in models:
        run(model, heads[0])
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, model in enumerate(models):
            best[i] = min(best[i], timed(model))
    return [{"tokens_per_s": len(heads) * new_tokens / t, "prompts": len(heads), "new_tokens": new_tokens,
             "rounds": rounds, "threads": torch.get_num_threads()} for t in best]


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (safetensors, or PyTorch .bin) in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))


def side_by_side(folders: list[str], samples: np.ndarray, device: torch.device, figures_of=None) -> list[dict]:
    """Each folder's held-out perplexity on `samples`, weights on disk and greedy tokens/s (the models loaded as
    users load them, timed in turns), and whatever `figures_of(model)` adds."""
    from llmray.model.build import load_for_inference

    models = [load_for_inference(str(f), device) for f in folders]
    figures = [{**held_out_perplexity(m, samples), "weights_bytes": weights_bytes(f), **(figures_of(m) if figures_of else {})}
               for m, f in zip(models, folders)]
    for f, speed in zip(figures, generation_speeds(models, samples)):
        f.update(speed)
    return figures


# The figures a before/after report compares, in the order printed: (label, key, format).
FIGURES = (("perplexity", "ppl", lambda v: f"{v:.3f}"),
           ("parameters", "parameters", lambda v: f"{v / 1e6:.2f}M"),
           ("non-zero", "nonzero_share", lambda v: f"{100 * v:.1f}%"),
           ("weights", "weights_bytes", lambda v: f"{v / 1e6:.2f}MB"),
           ("tokens/s", "tokens_per_s", lambda v: f"{v:.1f}"))
RATIOS = (("perplexity", "ppl_ratio", 4), ("parameters", "parameter_ratio", 3), ("weights", "size_ratio", 3),
          ("tokens/s", "speed_ratio", 3))


def report_text(report: dict) -> str:
    """A quantize or prune report as people read it: what was done and where it was measured, a table of the
    figures every measured model has (before, after, and any model between, in the report's order), the after/before
    ratios the report holds, and where it is saved."""
    columns = [(name, report[name]) for name in ("before", "pruned", "after") if name in report]
    rows = [(label, key, fmt) for label, key, fmt in FIGURES if all(key in figures for _, figures in columns)]
    held_out = report["held_out"]
    lines = [f"{report['action']} on {report['device']}, measured on {held_out['samples']} held-out samples "
             f"({held_out['what']}):",
             "  " + " " * 12 + "".join(f"{name:>12}" for name, _ in columns)]
    lines += ["  " + f"{label:<12}" + "".join(f"{fmt(figures[key]):>12}" for _, figures in columns)
              for label, key, fmt in rows]
    ratios = [f"{label} x{report[key]:.{digits}f}" for label, key, digits in RATIOS if key in report]
    notes = [f"tokens/s: greedy, batch 1, {columns[-1][1]['threads']} threads"]
    if any(key == "nonzero_share" for _, key, _ in rows):
        notes.append("non-zero: the share of decoder Linear weights")
    lines += [f"  after/before: {', '.join(ratios)} ({'; '.join(notes)})", f"  report: {report['report']}"]
    return "\n".join(lines)
