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
def perplexity(model: torch.nn.Module, samples: np.ndarray, batch_size: int = 8) -> dict:
    """Token-weighted mean next-token loss over the samples, and its exponential."""
    device, total, count = model_device(model), 0.0, 0
    for start in range(0, len(samples), batch_size):
        ids = torch.from_numpy(samples[start:start + batch_size].astype(np.int64)).to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
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


def answer_matches(answer: str, reference: str) -> bool:
    """Exact match after the usual normalisation (SQuAD's, in short): case, surrounding space and punctuation."""
    def norm(text: str) -> str:
        return " ".join(text.lower().strip().strip(".!?,;:'\"").split())

    return norm(answer) == norm(reference)


@torch.inference_mode()
def chat_exact_match(folder: str, conversations: list[list[dict]], max_new_tokens: int = 16,
                     device: str | None = None) -> dict:
    """Each conversation's last (assistant) message is the reference; the model answers the turns before it,
    rendered with its chat template, greedily up to its end of turn. Returns accuracy, and every answer."""
    from transformers import AutoTokenizer

    from llmray.data.template import render, stop_token_ids
    from llmray.model import inference_device, load_for_inference

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_for_inference(folder, inference_device(device))
    stops, answers = stop_token_ids(tokenizer), []
    for messages in conversations:
        if messages[-1]["role"] != "assistant":
            raise EvalError("every conversation to score must end with the assistant's reference answer")
        prompt = render(tokenizer, messages[:-1], add_generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids], device=model_device(model))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id or stops[0])
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        answers.append({"prompt": messages[-2]["content"], "reference": messages[-1]["content"], "answer": answer,
                        "correct": answer_matches(answer, messages[-1]["content"])})
    correct = sum(a["correct"] for a in answers)
    return {"exact_match": correct / max(len(answers), 1), "correct": correct, "n": len(answers), "answers": answers}
