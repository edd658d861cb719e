"""What fine-tuning costs.

1. LoRA and QLoRA (the same adapters over a bitsandbytes NF4 base) against full fine-tuning of the same model
   through the real spine (`llmray.train.trainer.fit`: Ray Data stream, Ray Train, DeepSpeed ZeRO-2, 2 CPU
   workers): the trainable-parameter share, the peak memory of a worker (its process RSS on CPU), training
   tokens/s over the last window, and the held-out loss (assistant tokens) at the end.
2. Conversations packed into rows (llmray's way, block-diagonal attention from position ids) against one
   conversation per row padded to the batch's longest, on the same conversations in one process: tokens/s of
   real (non-padding) tokens and of assistant tokens trained, one pass each, the same optimizer.

    python benchmarks/finetune.py [--steps 30]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from common import base_model, emit, stdlib_corpus

SEQ = 512
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024)


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Additions asked over one to four turns: conversations of varied length, as real chat data has."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conv = []
        for _ in range(rng.randint(1, 4)):
            a, b = rng.randrange(100), rng.randrange(100)
            conv += [{"role": "user", "content": f"What is {a} plus {b}? Show the sum."},
                     {"role": "assistant", "content": f"{a} + {b} = {a + b}. The sum of {a} and {b} is {a + b}."}]
        out.append(conv)
    return out


def spine(model_dir: str, chats: str, storage: str, method: str, steps: int) -> dict:
    from llmray.model.build import build_model
    from llmray.model.lora import trainable, with_lora
    from llmray.recipe.load import load_recipe
    from llmray.train.checkpoint import read_state
    from llmray.train.trainer import fit

    recipe = load_recipe("jobs/sft_tiny.yaml", [
        f"model.pretrained={model_dir}", f"data.conversations={chats}", f"run.storage_path={storage}",
        f"run.name={method}", f"data.seq_len={SEQ}", f"finetune.method={method}", f"train.max_steps={steps}",
        "train.log_every=10", f"train.eval_every={steps}", "train.checkpoint_every=0", "train.micro_batch_size=4",
        "train.global_batch_size=16"])
    summary = fit(recipe)
    last = read_state(summary.checkpoint).history[-1]
    model = build_model(recipe.model, 0)
    n_train, n_all = trainable(with_lora(model, recipe.finetune.lora)) if recipe.finetune.adapters else (
        sum(p.numel() for p in model.parameters()),) * 2
    return {"method": method, "parameters": n_all, "trainable": n_train, "trainable_share": round(n_train / n_all, 4),
            "tokens_per_s": round(last["tokens_per_s"]), "peak_memory_gb_per_worker": round(last["peak_memory_gb"], 3),
            "val_loss": round(summary.val_loss, 4), "steps": summary.steps}


def one_pass(model, batches: list[dict]) -> tuple[float, int, int]:
    """(seconds, real tokens, assistant tokens) of one training pass over `batches`."""
    import torch

    from llmray.train.batch import model_inputs

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    real = trained = 0
    start = time.perf_counter()
    for batch in batches:
        inputs = model_inputs(batch, torch.device("cpu"))
        if "attention_mask" in batch:
            inputs["attention_mask"] = torch.from_numpy(batch["attention_mask"]).long()
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int(batch["real"])
        trained += int((batch["labels"][:, 1:] != -100).sum())
    return time.perf_counter() - start, real, trained


def real_tokens(ids, positions, pad: int) -> int:
    """A packed row's tokens before its padding (the last segment, all pad ids, when the row has one)."""
    import numpy as np

    last = int(np.flatnonzero(positions == 0)[-1])
    return last if last and (ids[last:] == pad).all() else len(ids)


def packing(model_dir: str, convs: list[list[dict]], rows_per_batch: int, convs_per_batch: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray.data.pack import chat_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = chat_rows(tok, convs, SEQ)
    packed = []
    for i in range(0, len(rows["input_ids"]), rows_per_batch):
        b = {k: v[i:i + rows_per_batch] for k, v in rows.items()}
        b["real"] = sum(real_tokens(ids, pos, pad) for ids, pos in zip(b["input_ids"], b["position_ids"]))
        packed.append(b)
    unpacked = []
    singles = [chat_rows(tok, [c], SEQ) for c in convs]
    for i in range(0, len(singles), convs_per_batch):
        group = singles[i:i + convs_per_batch]
        lengths = [int((g["position_ids"][0] == np.arange(SEQ)).sum()) for g in group]  # the conversation's tokens
        width = max(lengths)
        b = {k: np.stack([g[k][0][:width] for g in group]) for k in ("input_ids", "labels")}
        b["attention_mask"] = np.stack([np.arange(width) < n for n in lengths]).astype(np.int64)
        b["real"] = sum(lengths)
        unpacked.append(b)
    out = {}
    for name, batches in (("packed", packed), ("one_per_row", unpacked)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        one_pass(model, batches[:2])  # warm-up
        seconds, real, trained = one_pass(model, batches)
        out[name] = {"batches": len(batches), "seconds": round(seconds, 2), "real_tokens_per_s": round(real / seconds),
                     "assistant_tokens_per_s": round(trained / seconds)}
    out["packed_over_one_per_row"] = round(out["packed"]["assistant_tokens_per_s"]
                                           / out["one_per_row"]["assistant_tokens_per_s"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--conversations", type=int, default=400)
    args = p.parse_args()
    import json
    import os

    import ray

    _, tok = stdlib_corpus()
    convs = conversations(args.conversations)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, chats = os.path.join(tmp, "base"), os.path.join(tmp, "chats")
        base_model(tok, model_dir, SEQ, **MODEL)
        os.makedirs(chats)
        with open(os.path.join(chats, "train.jsonl"), "w") as f:
            f.writelines(json.dumps({"messages": c}) + "\n" for c in conversations(2000, seed=1))
        pack = packing(model_dir, convs, rows_per_batch=4, convs_per_batch=16)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = [spine(model_dir, chats, os.path.join(tmp, "runs"), m, args.steps)
                for m in ("full", "lora", "qlora")]
        ray.shutdown()
    full, lora, qlora = runs
    emit("finetune", {
        "model": {**MODEL, "seq_len": SEQ}, "workers": 2, "zero_stage": 2, "steps": args.steps,
        "full": full, "lora": lora, "qlora": qlora,
        "qlora_over_lora_tokens_per_s": round(qlora["tokens_per_s"] / lora["tokens_per_s"], 2),
        "qlora_over_lora_peak_memory": round(qlora["peak_memory_gb_per_worker"] / lora["peak_memory_gb_per_worker"], 2),
        "lora_over_full_tokens_per_s": round(lora["tokens_per_s"] / full["tokens_per_s"], 2),
        "lora_over_full_peak_memory": round(lora["peak_memory_gb_per_worker"] / full["peak_memory_gb_per_worker"], 2),
        "packing": pack,
    })


if __name__ == "__main__":
    main()
