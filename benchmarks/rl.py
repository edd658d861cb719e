"""What online RL (GRPO) costs, per placement and reference, and beside TRL.

1. GRPO through the real spine (`llmray.train.trainer.fit`: prompts through the Ray Data stream, Ray Train, DeepSpeed
   ZeRO-2, 2 CPU workers), rollouts on llmray's serving engine: LoRA colocated (each worker generates between its
   steps), LoRA on a separate generator actor, LoRA with a KL to the base (adapters off), full fine-tuning colocated
   with a KL to a frozen copy. Per mode, over the last window: completions/s, the generator's tokens/s, where a step's
   time goes (generate, score, sync, train), a worker's peak memory (its process RSS on CPU), the weight sync's
   parity and the sampler-learner gap.
2. TRL's GRPOTrainer (LoRA through its peft_config, generating with transformers' generate) on the same model,
   prompts, reward and machine, in one process using both cores: completions/s over the same steps.
3. Rollouts alone, in one process: the engine's batched generation (`Engine.generate`, what each step's rollouts
   run on) against one-by-one transformers `generate` of the same prompts, sampled the same way: tokens/s.

    python benchmarks/rl.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from common import base_model, emit, stdlib_corpus

SEQ = 64  # the longest prompt
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024)
GROUP, COMPLETION, PROMPTS_PER_STEP = 8, 32, 8
# the right sum, and (so that a random-init model earns some reward and its weights move) any digit, half as much
REWARDS = "rl.rewards=[{kind: numeric, field: answer}, {kind: regex, pattern: '[0-9]', weight: 0.5}]"
# (finetune, placement, beta): the two placements, and a KL to each kind of reference
MODES = [("lora", "colocated", 0.0), ("lora", "separate", 0.0), ("lora", "colocated", 0.04),
         ("full", "colocated", 0.04)]


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        out.append({"prompt": f"What is {a} plus {b}?", "answer": str(a + b)})
    return out


def spine(model_dir: str, path: str, storage: str, method: str, placement: str, beta: float, steps: int) -> dict:
    from llmray import metric_names as M
    from llmray.recipe.load import load_recipe
    from llmray.train.checkpoint import read_state
    from llmray.train.trainer import fit

    overrides = [
        f"model.pretrained={model_dir}", f"data.conversations={path}", f"run.storage_path={storage}",
        f"run.name={method}-{placement}-b{beta}", f"data.seq_len={SEQ}", "data.val_fraction=0.0",
        f"finetune.method={method}", f"train.max_steps={steps}", "train.log_every=10", "train.checkpoint_every=0",
        "train.micro_batch_size=4", f"train.global_batch_size={PROMPTS_PER_STEP}",
        f"train.lr={2e-3 if method == 'lora' else 2e-4}", f"rl.group_size={GROUP}",
        f"rl.max_completion_tokens={COMPLETION}", f"rl.beta={beta}", f"rl.rollout.placement={placement}",
        "rl.top_k=0", "rl.updates=1",  # TRL's defaults (the demo recipe samples among 3 and updates twice)
        REWARDS]
    if placement == "separate":  # 2 CPUs: two workers, a generator actor and the tokenize task share them
        overrides += ["scaling.cpus_per_worker=0.5", "scaling.data_cpus=0.5", "rl.rollout.cpus_per_actor=0.5"]
    summary = fit(load_recipe("jobs/grpo_tiny.yaml", overrides))
    last = read_state(summary.checkpoint).history[-1]
    split = {name: round(last[key], 3) for name, key in
             (("generate", M.GENERATE_S), ("score", M.SCORE_S), ("sync", M.SYNC_S), ("train", M.TRAIN_S))}
    return {"finetune": method, "placement": placement, "beta": beta,
            "completions_per_s": round(PROMPTS_PER_STEP * GROUP / last[M.STEP_TIME_S], 1),
            "step_s": round(last[M.STEP_TIME_S], 3), "seconds_per_step": split,
            "sync_over_step": round(last[M.SYNC_S] / last[M.STEP_TIME_S], 3),
            "rollout_tokens_per_s_per_generator": round(last[M.ROLLOUT_TOKENS_PER_S]),
            "completion_tokens": round(last[M.COMPLETION_LENGTH], 1),
            "peak_memory_gb_per_worker": round(last[M.PEAK_MEMORY_GB], 3),
            "sync_parity_max_diff": last[M.SYNC_PARITY], "sampler_learner_gap": last[M.SAMPLING_GAP],
            "reward_first_last": [round(summary.rewards["first"], 3), round(summary.rewards["last"], 3)]}


def trl_grpo(model_dir: str, data: list[dict], steps: int) -> dict:
    """TRL's GRPOTrainer, LoRA (r 16, all linear layers, as jobs/grpo_tiny.yaml), the same prompts per step and
    group size, fp32 on CPU, generating with transformers' generate."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from llmray.objectives.rewards import Rewards
    from llmray.recipe.load import load_recipe

    torch.set_num_threads(os.cpu_count() or 2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = Rewards(load_recipe("jobs/grpo_tiny.yaml", [REWARDS]).rl.rewards)  # the same weighted sum

    def reward(completions, answer, **kw):  # conversational: each completion is its assistant message
        texts = [c[0]["content"] for c in completions]
        return ours.score(texts, texts, [{"answer": a} for a in answer]).total.tolist()

    conversational = [{"prompt": [{"role": "user", "content": d["prompt"]}], "answer": d["answer"]} for d in data]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[], num_generations=GROUP,
                          per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, max_completion_length=COMPLETION,
                          max_steps=steps, learning_rate=2e-3, logging_steps=10, save_strategy="no", beta=0.0,
                          dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(conversational),
                              peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        trainer.args.max_steps = 2
        trainer.train()  # warm-up
        trainer.args.max_steps = steps
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    import resource

    return {"completions_per_s": round(steps * PROMPTS_PER_STEP * GROUP / seconds, 1), "seconds": round(seconds, 1),
            "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def rollouts_alone(model_dir: str, data: list[dict], prompts_n: int = 16) -> dict:
    """Completion tokens/s of `prompts_n` prompts x GROUP completions: the engine in batches, and transformers'
    `generate` one completion at a time (sampling, temperature 1, the same length limit)."""
    import torch
    from transformers import AutoTokenizer

    from llmray.objectives.rollout import Generator, seed_of
    from llmray.serve.sampling import Sampling

    torch.set_num_threads(os.cpu_count() or 2)
    generator = Generator(model_dir, model_dir, max_batch_size=64, device="cpu")
    engine, tok = generator.engine, AutoTokenizer.from_pretrained(model_dir)
    ids = [engine.encode(engine.chat_prompt([("user", d["prompt"])])) for d in data[:prompts_n]]
    prompts = [p for p in ids for _ in range(GROUP)]
    samplings = [Sampling(max_tokens=COMPLETION, seed=seed_of(0, 0, 0, i, j)) for i in range(prompts_n)
                 for j in range(GROUP)]
    generator.generate(prompts[:GROUP], samplings[:GROUP])  # warm-up
    start = time.perf_counter()
    made = sum(len(r.tokens) for r in generator.generate(prompts, samplings))
    engine_s = time.perf_counter() - start
    model = engine.model
    start, one_by_one = time.perf_counter(), 0
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), do_sample=True, temperature=1.0, top_k=0, max_new_tokens=COMPLETION,
                                 pad_token_id=tok.eos_token_id, eos_token_id=sorted(engine.stops))
            one_by_one += out.shape[1] - len(p)
    generate_s = time.perf_counter() - start
    return {"completions": len(prompts), "engine_tokens_per_s": round(made / engine_s),
            "generate_one_by_one_tokens_per_s": round(one_by_one / generate_s),
            "engine_over_one_by_one": round((made / engine_s) / (one_by_one / generate_s), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    import ray

    _, tok = stdlib_corpus()
    data = prompts(args.steps * PROMPTS_PER_STEP * 2 + 100)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, path = os.path.join(tmp, "base"), os.path.join(tmp, "prompts.jsonl")
        base_model(tok, model_dir, SEQ + COMPLETION, **MODEL)
        with open(path, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in data)
        alone = rollouts_alone(model_dir, data)
        trl = trl_grpo(model_dir, data, args.steps)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = [spine(model_dir, path, os.path.join(tmp, "runs"), *mode, args.steps) for mode in MODES]
        ray.shutdown()
    ours = runs[0]
    emit("rl", {
        "model": {**MODEL, "max_prompt": SEQ}, "workers": 2, "zero_stage": 2, "steps": args.steps,
        "prompts_per_step": PROMPTS_PER_STEP, "group_size": GROUP, "max_completion_tokens": COMPLETION,
        "modes": runs, "trl_grpo_lora": trl, "rollouts_alone": alone,
        "llmray_over_trl_completions_per_s": round(ours["completions_per_s"] / trl["completions_per_s"], 2),
    })


if __name__ == "__main__":
    main()
