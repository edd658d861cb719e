"""What preference tuning costs, per reference mode, and beside TRL.

1. DPO through the real spine (`llmray.train.trainer.fit`: Ray Data stream of packed pairs, Ray Train, DeepSpeed
   ZeRO-2 or 3, 2 CPU workers) with each way of getting the reference's log-probabilities: LoRA against the base
   with its adapters off (no second copy), against a frozen copy, and against log-probabilities precomputed by a
   Ray Data pass; full fine-tuning against a frozen copy (whole under ZeRO-2, partitioned under ZeRO-3) and
   precomputed; reference-free SimPO. Per mode: training tokens/s and pairs/s over the last window, a worker's
   peak memory (its process RSS on CPU), and for the precomputed reference what its pass cost (rows, seconds).
2. TRL's DPOTrainer (LoRA through its peft_config, so its reference is the base with the adapters off too) on the
   same model, pairs and machine, in one process using both cores: pairs/s over the same number of pairs. The
   ratio llmray/TRL is of pairs/s (llmray's rows are packed, TRL's padded, so tokens/s would not compare).

    python benchmarks/preference.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from common import base_model, emit, stdlib_corpus

SEQ = 256
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024)
# (finetune, reference, loss, ZeRO stage): each way of getting the reference, for LoRA and for full fine-tuning
MODES = [("lora", "adapters", "dpo", 2), ("lora", "copy", "dpo", 2), ("lora", "precomputed", "dpo", 2),
         ("full", "copy", "dpo", 2), ("full", "copy", "dpo", 3), ("full", "precomputed", "dpo", 2),
         ("lora", "auto", "simpo", 2)]


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Additions with a right (chosen) and a wrong (rejected) answer, in TRL's conversational format."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        q = [{"role": "user", "content": f"What is {a} plus {b}? Show the sum."}]
        right, wrong = a + b, a + b + rng.choice([-10, -1, 1, 10])
        out.append({"prompt": q, "chosen": [{"role": "assistant", "content": f"{a} + {b} = {right}."}],
                    "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}."}]})
    return out


def pairs_per_row(model_dir: str, data: list[dict]) -> float:
    from transformers import AutoTokenizer

    from llmray.data.pack import pair_rows

    rows = pair_rows(AutoTokenizer.from_pretrained(model_dir), data, SEQ)
    return len(data) / len(rows["input_ids"])


def spine(model_dir: str, path: str, storage: str, method: str, reference: str, loss: str, stage: int, steps: int,
          per_row: float) -> dict:
    from llmray.recipe.load import load_recipe
    from llmray.train.checkpoint import read_state
    from llmray.train.trainer import fit

    recipe = load_recipe("jobs/sft_tiny.yaml", [
        f"model.pretrained={model_dir}", f"data.conversations={path}", f"run.storage_path={storage}",
        f"run.name={method}-{reference}-{loss}-z{stage}", f"data.seq_len={SEQ}", f"finetune.method={method}",
        f"train.max_steps={steps}", "train.log_every=10", "train.eval_every=0", "train.checkpoint_every=0",
        "train.micro_batch_size=4", "train.global_batch_size=16", f"preference.loss={loss}",
        f"preference.reference={reference}", "data.val_fraction=0.0", f"train.zero_stage={stage}"])
    summary = fit(recipe)
    last = read_state(summary.checkpoint).history[-1]
    where = {"copy": "a frozen copy, " + ("partitioned by ZeRO-3" if stage == 3 else "whole on each worker"),
             "adapters": "the base with the adapters off", "precomputed": "precomputed by a Ray Data pass",
             "none": "none (reference-free)"}[recipe.reference]
    out = {"finetune": method, "reference": where, "loss": loss, "zero_stage": stage,
           "tokens_per_s": round(last["tokens_per_s"]), "pairs_per_s": round(last["tokens_per_s"] / SEQ * per_row, 1),
           "peak_memory_gb_per_worker": round(last["peak_memory_gb"], 3),
           "reward_accuracy": round(last["rewards/accuracies"], 3)}
    if recipe.reference == "precomputed":  # the pass before training: its cost, paid once per run
        with open(os.path.join(storage, recipe.run.name, "reference", "pass.json")) as f:
            out["reference_pass"] = json.load(f)
    return out


def trl_dpo(model_dir: str, data: list[dict], steps: int) -> dict:
    """TRL's DPOTrainer, LoRA (r 16, all linear layers, as jobs/sft_tiny.yaml), batch 16, fp32 on CPU."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                         per_device_train_batch_size=16, max_steps=steps, learning_rate=3e-3, beta=0.1,
                         logging_steps=10, save_strategy="no", max_length=SEQ, dataloader_num_workers=0)
        trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(data),
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        trainer.args.max_steps = 3
        trainer.train()  # warm-up: first steps allocate and build the graph
        trainer.args.max_steps = steps
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    import resource

    return {"pairs_per_s": round(steps * 16 / seconds, 1), "seconds": round(seconds, 1),
            "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import ray

    _, tok = stdlib_corpus()
    data = pairs(args.steps * 16 + 200)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, path = os.path.join(tmp, "base"), os.path.join(tmp, "pairs.jsonl")
        base_model(tok, model_dir, SEQ, **MODEL)
        with open(path, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in data)
        per_row = pairs_per_row(model_dir, data)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = [spine(model_dir, path, os.path.join(tmp, "runs"), *mode, args.steps, per_row) for mode in MODES]
        ray.shutdown()
        trl = trl_dpo(model_dir, data, args.steps)
    ours = runs[0]
    emit("preference", {
        "model": {**MODEL, "seq_len": SEQ}, "workers": 2, "zero_stage": 2, "steps": args.steps, "global_batch": 16,
        "pairs_per_row": round(per_row, 2), "modes": runs, "trl_dpo_lora": trl,
        "llmray_over_trl_pairs_per_s": round(ours["pairs_per_s"] / trl["pairs_per_s"], 2),
        "peak_memory_over_adapters": {f"{r['finetune']} {r['reference']} ZeRO-{r['zero_stage']}":
                                      round(r["peak_memory_gb_per_worker"] / ours["peak_memory_gb_per_worker"], 2)
                                      for r in runs[1:]},
    })


if __name__ == "__main__":
    main()
