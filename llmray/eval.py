"""Measuring a model folder without Ray: perplexity on held-out samples, generation speed, weights on disk.

The held-out samples are the same a training run validates on (`data.split` says which documents, and
`pack.first_samples` packs them in the stream's order, without Ray).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from llmray.config import default
from llmray.data.pack import StreamSpec, first_samples
from llmray.data.split import HeldOut
from llmray.errors import LlmrayError


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


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model: torch.nn.Module, samples: np.ndarray, batch_size: int = 8,
               positions: np.ndarray | None = None) -> dict:
    """Token-weighted mean next-token loss over the samples, and its exponential. With `positions` (position ids
    restarting at each document, `pack.document_positions`), each document is read on its own."""
    device, total, count = model_device(model), 0.0, 0
    for start in range(0, len(samples), batch_size):
        ids = torch.from_numpy(samples[start:start + batch_size].astype(np.int64)).to(device)
        kwargs = {}
        if positions is not None:  # no KV cache: with one, transformers ignores the restarts
            kwargs = {"position_ids": torch.from_numpy(positions[start:start + batch_size].astype(np.int64)).to(device),
                      "use_cache": False}
        logits = model(input_ids=ids, **kwargs).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.inference_mode()
def generation_speeds(models: list[torch.nn.Module], samples: np.ndarray, prompt_tokens: int = 32,
                      new_tokens: int = 64, prompts: int = 4, rounds: int = 3) -> list[dict]:
    """Greedy decoding, one prompt at a time (the latency a single user sees), every answer `new_tokens` long.
    The models take turns, `rounds` times, after one untimed warm-up each, and each keeps its best round: on a
    shared machine, turns and best-of keep load spikes from deciding the ratio."""
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

