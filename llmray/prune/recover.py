"""Retraining a pruned model: a recipe's `prune:` block (`with_pruned_model`, resolved by the commands before
training starts), and `llmray prune --recover-steps N`: prune, then retrain the pruned model on the stream it was
trained on (the Minitron recipe). Structured pruning (depth, width) recovers by distilling from the unpruned model, on its logits
alone; unstructured pruning retrains on the LM loss with its zeros held. The retraining is an ordinary run (Ray
Train, DeepSpeed, checkpoints, resume) of the recipe the export recorded, with a `prune:` block; its last
checkpoint is exported into --out and measured beside the source and the pruned model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from llmray import storage
from llmray.evals.measure import report_text
from llmray.export.folder import export
from llmray.model import lineage
from llmray.model.build import inference_device, load_for_inference
from llmray.outdir import free_target, staged
from llmray.prune.folder import (
    REPORT_FILE,
    PruneError,
    calibration,
    check_spec,
    measure,
    prune_folder,
    ratios,
    recipe_key,
    what_was_done,
)
from llmray.recipe.load import apply_overrides, recipe_from_dict
from llmray.recipe.schema import SPARSE_METHODS, PruneSettings, Recipe
from llmray.train.trainer import fit

RECOVERY_DISTILL = {"alpha": 1.0, "temperature": 1.0}  # Minitron retrains on the teacher's logits alone
RUN_SUFFIX = "-recovery"
PRUNED_DIR = "pruned"  # in the run folder: the model its prune: block made


def with_pruned_model(recipe: Recipe) -> Recipe:
    """A recipe with a `prune:` block trains a pruned copy of model.pretrained, made here once into the run
    folder's pruned/ and reused while its source and spec are unchanged (a resumed run finds it). The training
    run is the pruned model's recovery. A recipe without the block is returned as it is."""
    p = recipe.prune
    if p is None:
        return recipe
    out = os.path.join(recipe.run.folder, PRUNED_DIR)
    made = lineage.read(out).get("prune", {})
    if made.get("spec") != p.model_dump() or made.get("source") != str(Path(recipe.model.pretrained).resolve()):
        print(f"[llmray] pruning {recipe.model.pretrained} ({p.method}) into {out}", flush=True)
        print(report_text(prune_folder(recipe.model.pretrained, out, p, overwrite=True, flag=recipe_key)), flush=True)
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"pretrained": out})})


def recovery_recipe(src: str, spec: PruneSettings, steps: int, run_folder: str, overrides: list[str]) -> Recipe:
    """The recipe that trained `src` (recorded at export), now starting from `src` pruned by `spec`, for `steps`
    steps, with the unpruned `src` as teacher when the pruning is structured. `overrides`: key=value, last."""
    raw = lineage.read(src).get("recipe")
    if raw is None:
        raise PruneError(f"--recover-steps: {src} records no training recipe in {lineage.EXPORT_INFO} (exported by "
                         "an older llmray); export its checkpoint again")
    raw = copy.deepcopy(raw)
    raw["model"] = {"pretrained": src}
    raw["data"]["tokenizer"] = src
    raw["prune"] = spec.model_dump(exclude_none=True)
    raw["train"].update(max_steps=steps, warmup_steps=min(raw["train"]["warmup_steps"], steps // 10))
    raw["run"].update(name=Path(run_folder).name, storage_path=str(Path(run_folder).parent))
    raw["quant"] = {}  # the recovered model is measured in full precision; `llmray quantize` it next
    raw["finetune"] = None
    raw["distill"] = None if spec.method in SPARSE_METHODS else {"teacher": src, **RECOVERY_DISTILL}
    return recipe_from_dict(apply_overrides(raw, list(overrides)))


def recover(src: str, out: str, spec: PruneSettings, steps: int, overrides: list[str] = (), overwrite: bool = False,
            device: str | None = None) -> dict:
    """Prune `src`, retrain it `steps` steps, export it into `out`; returns the report (also prune_report.json),
    with the figures before, after pruning and after recovery."""
    if steps <= 0:
        raise PruneError(f"--recover-steps must be a positive number of training steps; got {steps}")
    if not Path(src, "config.json").is_file():
        raise PruneError(f"{src} is not a Hugging Face model folder (no config.json); export a checkpoint first")
    src = os.path.abspath(src)
    check_spec(load_for_inference(src, inference_device("cpu")), spec)  # named as flags, before any training
    out = free_target(out, overwrite)
    if storage.is_uri(out):
        raise PruneError("--recover-steps trains in a run folder beside --out, which must be a local path")
    recipe = recovery_recipe(src, spec, steps, out + RUN_SUFFIX, overrides)
    held_out, samples = calibration(src, spec)
    summary = fit(with_pruned_model(recipe))
    pruned = os.path.join(recipe.run.folder, PRUNED_DIR)
    made = lineage.read(pruned)["prune"]  # what the pruning did, as the pruned folder's lineage records it
    details = {k: v for k, v in made.items() if k not in ("method", "spec", "source")}
    how = "distilled from the unpruned model" if recipe.distill is not None else "retrained with the zeros held"
    recovery = {"steps": steps, "how": how, "run": recipe.run.folder, "tokens": summary.tokens,
                "checkpoint": summary.checkpoint, "val_loss": summary.val_loss}
    dev = inference_device(device)
    with staged(out) as partial:
        export(summary.checkpoint, str(partial), overwrite=True)
        # measured together, not taken from the pruned folder's report: the models take turns at tokens/s
        before, after_pruning, after = measure([src, pruned, str(partial)], samples, dev)
        lineage.write(partial, {**lineage.read(partial), "prune": {**made, "recovery": recovery}})
        report = {
            "action": f"{spec.method} pruning ({what_was_done(spec.method, details)}, then {steps} recovery steps "
                      f"({how}))", "report": f"{out}/{REPORT_FILE}",
            "method": spec.method, **details, "source": src, "out": out, "device": str(dev),
            "input_report": lineage.input_report(src), "held_out": {"what": held_out.describe(), "samples": len(samples)},
            "recovery": recovery, "before": before, "pruned": after_pruning, "after": after, **ratios(before, after),
            "pruned_ratios": ratios(before, after_pruning),
        }
        Path(partial, REPORT_FILE).write_text(json.dumps(report, indent=1))
        report["files"] = sorted(p.name for p in Path(partial).iterdir())
    return report
