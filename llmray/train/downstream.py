"""A recipe's eval tasks, answered on the training ranks by the engine's own model and scored as `llmray eval`
scores them: no export, no copy of the weights. Its time is reported (eval_s), since the ranks train not while
they run."""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from llmray import metric_names as M
from llmray.evals.backends import LocalModel
from llmray.evals.score import answer, score
from llmray.evals.tasks import Task, load_task
from llmray.recipe.schema import RecipeError


def training_tasks(paths: list[str], vision: bool) -> list[Task]:
    """A recipe's eval.tasks, read and checked against the model being trained, before any worker starts: image
    tasks for a vision-language run (`vision`, its ranks hold the processor), text tasks for a text one."""
    tasks = [load_task(path) for path in paths]
    wrong = [t.path for t in tasks if (t.spec.image is not None) != vision]
    if wrong and vision:
        raise RecipeError(f"eval.tasks: {', '.join(wrong)}: text tasks, and the run trains a vision-language model "
                          "(its tasks need an image field, image: FIELD)")
    if wrong:
        raise RecipeError(f"eval.tasks: {', '.join(wrong)}: image tasks, and the run trains a text-only model (no "
                          "vision: block)")
    return tasks


def evaluate_tasks(engine, tokenizer, tasks: list[Task], device: torch.device, zero3: bool, processor=None) -> dict:
    """eval/<task>/<metric> figures, and eval_s. Under ZeRO-1/2 each rank answers every world-th example and the
    answers are gathered; under ZeRO-3 a forward is a collective, so every rank answers them all, in step.
    `processor`: a vision-language run's, which prepares an image task's images as `llmray eval` does."""
    started = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    split = world > 1 and not zero3
    backend = LocalModel(engine.module, tokenizer, device, synced=zero3 and world > 1, processor=processor)
    engine.eval()
    out = {}
    # Compiled blocks (train.kernels.compile) run eagerly here: prompts and generated lengths change shape at each
    # forward, and each new shape would be one more compile for a few forwards. Validation, at training shapes, is
    # compiled.
    with torch.compiler.set_stance("force_eager"):
        for task in tasks:
            outputs = answer(backend, dataclasses.replace(task, examples=task.examples[rank::world]) if split else task)
            if split:
                parts: list = [None] * world
                dist.all_gather_object(parts, outputs)
                outputs = [parts[i % world][i // world] for i in range(len(task.examples))]
            for metric, value in score(task, outputs).items():
                if metric not in ("examples", "tokens"):
                    out[M.eval_metric(task.name, metric)] = value
    engine.train()
    out[M.EVAL_S] = time.perf_counter() - started
    return out
