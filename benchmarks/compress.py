"""Distillation and pruning, measured on the stdlib corpus through the real spine (`fit`: Ray Data, Ray Train,
ZeRO-2, 2 CPU workers).

1. A teacher (jobs/pretrain_tiny.yaml's model: 4 layers, hidden 128) is pretrained and exported.
2. Distillation: a student with half its layers trains for the same tokens twice, on the LM loss alone and
   distilled from the teacher (alpha, T as given). Held-out perplexity of both, and the tokens/s of each: the
   teacher's forward is the step-time cost of distilling.
3. Pruning (`llmray.recover`, as `llmray prune --recover-steps`), every model measured the same way (`prune.measure`:
   the teacher's held-out samples, greedy tokens/s at batch 1):
   - depth (drop 2 of 4 layers) and width (MLP 512 -> 128 channels, 4 -> 2 heads) to about 65-75% of the
     parameters (the embeddings, untied, are half the model and are not pruned), each recovered by distillation
     for --recover-steps, against the same shape trained from scratch for the same steps;
   - wanda at 50% and at 2:4, before and after --recover-steps of retraining with the zeros held;
   - the control: the unpruned teacher trained --recover-steps more (the teacher is not trained to convergence,
     so any further training lowers its perplexity; a recovered model is judged against this, not the teacher).

    python benchmarks/compress.py [--steps 200] [--recover-steps 100] [--alpha 0.5] [--temperature 2.0]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from common import emit, stdlib_corpus

PRUNINGS = {  # name: (prune spec, the same shape from scratch: model overrides, or None for unstructured)
    "depth": ({"method": "depth", "drop_layers": 2}, ["model.num_layers=2"]),
    "width": ({"method": "width", "intermediate_size": 128, "heads": 2},
              ["model.intermediate_size=128", "model.num_heads=2", "model.extra={head_dim: 32}"]),
    "wanda_50": ({"method": "wanda", "sparsity": 0.5}, None),
    "wanda_2:4": ({"method": "wanda", "pattern": "2:4"}, None),
}


def figures(f: dict) -> dict:
    return {"ppl": round(f["ppl"], 2), "parameters": f["parameters"], "nonzero_share": round(f["nonzero_share"], 3),
            "weights_mb": round(f["weights_bytes"] / 1e6, 2), "tokens_per_s": round(f["tokens_per_s"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    args = p.parse_args()
    import ray

    from llmray.export.folder import export
    from llmray.model.build import inference_device
    from llmray.prune.folder import calibration, measure
    from llmray.prune.recover import recover
    from llmray.recipe.load import load_recipe
    from llmray.recipe.schema import PruneSettings
    from llmray.train.trainer import fit

    shards, tok = stdlib_corpus()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    pruning = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"data.shards={shards}", f"data.tokenizer={tok}", "train.eval_every=0", "train.checkpoint_every=0",
                  "train.log_every=25", "train.sample_prompt=null"]

        def recipe(name, steps, *overrides):
            return load_recipe("jobs/pretrain_tiny.yaml", [*common, f"run.storage_path={tmp}", f"run.name={name}",
                                                           f"train.max_steps={steps}", *overrides])

        teacher = fit(recipe("teacher", args.teacher_steps))
        teacher_dir = os.path.join(tmp, "teacher-export")
        export(teacher.checkpoint, teacher_dir)
        half = ["model.num_layers=2"]
        plain = fit(recipe("student-plain", args.steps, *half))
        taught = fit(recipe("student-distilled", args.steps, *half, f"distill.teacher={teacher_dir}",
                            f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}"))

        _, samples = calibration(teacher_dir, PruneSettings(method="depth"))
        for name, (spec, scratch_shape) in PRUNINGS.items():
            report = recover(teacher_dir, os.path.join(tmp, name), PruneSettings(**spec), args.recover_steps,
                             overrides=["train.log_every=25"])
            entry = {"spec": spec, "pruned": figures(report["pruned"]), "recovered": figures(report["after"]),
                     "recovery": report["recovery"]["how"], "recovery_tokens": report["recovery"]["tokens"]}
            if scratch_shape is not None:
                scratch = fit(recipe(f"{name}-scratch", args.recover_steps, *scratch_shape))
                scratch_dir = os.path.join(tmp, f"{name}-scratch-export")
                export(scratch.checkpoint, scratch_dir)
                entry["scratch"] = figures(measure([scratch_dir], samples, inference_device())[0])
                entry["recovered_over_scratch_ppl"] = round(report["after"]["ppl"] / entry["scratch"]["ppl"], 3)
            pruning[name] = entry
        # The control for recovery: the unpruned teacher trained as many more steps, as recovery trains
        continued = fit(recipe("teacher-continued", args.recover_steps, f"model.pretrained={teacher_dir}",
                               f"train.warmup_steps={args.recover_steps // 10}"))
        continued_dir = os.path.join(tmp, "teacher-continued-export")
        export(continued.checkpoint, continued_dir)
        teacher_figures, continued_figures = (figures(f) for f in measure([teacher_dir, continued_dir], samples,
                                                                          inference_device()))
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
        "pruning": {"recover_steps": args.recover_steps, "measured_on": f"{len(samples)} held-out samples",
                    "teacher": teacher_figures, "teacher_continued": continued_figures, **pruning},
    })


if __name__ == "__main__":
    main()
