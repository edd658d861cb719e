"""Distillation, measured on the stdlib corpus through the real spine (`fit`: Ray Data, Ray Train, ZeRO-2, 2 CPU
workers).

1. A teacher (jobs/pretrain_tiny.yaml's model, 4 layers) is pretrained and exported.
2. A student with half its layers trains for the same tokens twice: on the LM loss alone, and distilled from the
   teacher (alpha, T as given). Held-out perplexity of both (the student's own LM loss on the run's validation
   samples), and the tokens/s of each: the teacher's forward is the step-time cost of distilling.

    python benchmarks/compress.py [--steps 200] [--alpha 0.5] [--temperature 2.0]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from common import emit, stdlib_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    args = p.parse_args()
    import ray

    from llmray.config import load_recipe
    from llmray.export import export
    from llmray.train.trainer import fit

    shards, tok = stdlib_corpus()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        def recipe(name, steps, *overrides):
            return load_recipe("jobs/pretrain_tiny.yaml", [
                f"data.shards={shards}", f"data.tokenizer={tok}", f"run.storage_path={tmp}", f"run.name={name}",
                f"train.max_steps={steps}", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=25",
                "train.sample_prompt=null", *overrides])

        teacher = fit(recipe("teacher", args.teacher_steps))
        teacher_dir = os.path.join(tmp, "teacher-export")
        export(teacher.checkpoint, teacher_dir)
        half = ["model.num_layers=2"]
        plain = fit(recipe("student-plain", args.steps, *half))
        taught = fit(recipe("student-distilled", args.steps, *half, f"distill.teacher={teacher_dir}",
                            f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}"))
    ray.shutdown()

    def run(s) -> dict:
        return {"params": s.n_params, "tokens": s.tokens, "val_loss": round(s.val_loss, 4),
                "val_ppl": round(math.exp(s.val_loss), 2), "tokens_per_s": round(s.tokens_per_s or 0)}

    emit("compress", {
        "corpus": "stdlib", "workers": 2, "zero_stage": 2, "alpha": args.alpha, "temperature": args.temperature,
        "teacher": {**run(teacher), "steps": args.teacher_steps},
        "student_plain": run(plain), "student_distilled": run(taught),
        "distilled_over_plain_ppl": round(math.exp(taught.val_loss - plain.val_loss), 3),
        "distilled_over_plain_tokens_per_s": round((taught.tokens_per_s or 0) / (plain.tokens_per_s or 1), 2),
    })


if __name__ == "__main__":
    main()
