"""`llmray eval TARGET --task FILE ...`: every task's examples split over Ray actors (each holding the model, on a
GPU when the cluster has them), answered, then scored; a table on the console and the figures as JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ray

from llmray import hub, storage
from llmray.errors import LlmrayError
from llmray.evals.score import answer, score
from llmray.evals.tasks import Task, TaskError, load_task


@ray.remote
class EvalWorker:
    def __init__(self, target: str, model: str | None, api_key: str | None):
        from llmray import logs
        from llmray.evals.backends import backend_for

        logs.drop_import_noise()
        self.backend = backend_for(target, model, api_key)

    def run(self, task: Task) -> list[dict]:
        return answer(self.backend, task)


def evaluate(target: str, task_files: list[str], workers: int = 1, model: str | None = None,
             api_key: str | None = None, out: str | None = "eval_results.json") -> dict:
    """Score `target` (a model folder, local or s3://, a Hub id, or an OpenAI-compatible URL) on each task file; returns
    {"target", "tasks": {name: {metric: value}}, "answers": {name: [...]}}, also written to `out`."""
    from llmray import logs
    from llmray.cluster import ensure_ray

    tasks = [load_task(f) for f in task_files]  # every file checked before anything starts
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        raise TaskError(f"task names must be unique; got {', '.join(names)}")
    url = target.startswith(("http://", "https://"))
    if not url:
        target = hub.pinned(target, "llmray eval")  # every actor loads the same commit of a Hub model
    if not url and not storage.is_uri(target) and not hub.is_hub_id(target) and not Path(target, "config.json").is_file():
        raise TaskError(f"{target} is neither a model folder (no config.json; export one with `llmray export`), a "
                        "Hub model id (org/name) nor an http(s) URL")
    ensure_ray()
    logs.quiet_here()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers and not url else 0
    pool = [EvalWorker.options(num_gpus=gpus, num_cpus=0 if gpus else 1, runtime_env={"env_vars": hub.env()})
            .remote(target, model, api_key)
            for _ in range(workers)]
    results: dict = {"target": target, "tasks": {}, "answers": {}}
    for task in tasks:
        size = -(-len(task.examples) // workers)
        parts = [task.examples[i:i + size] for i in range(0, len(task.examples), size)]
        try:
            outputs = [o for got in ray.get([w.run.remote(dataclasses.replace(task, examples=p))
                                              for w, p in zip(pool, parts)]) for o in got]
        except (ray.exceptions.RayTaskError, ray.exceptions.ActorDiedError) as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, LlmrayError):  # one line for the user, not a trace from inside the actor
                raise type(cause)(f"task {task.name}: {cause}") from None
            raise
        results["tasks"][task.name] = score(task, outputs)
        results["answers"][task.name] = [{"line": e.line, "reference": e.target, **o}
                                         for e, o in zip(task.examples, outputs)]
        print(f"[llmray] {task.name}: {len(task.examples)} examples scored", flush=True)
    for w in pool:
        ray.kill(w)
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    rows = [(name, metric, value) for name, figures in results["tasks"].items()
            for metric, value in figures.items() if metric not in ("examples", "tokens")]
    width = max([len(n) for n, _, _ in rows] + [4])
    lines = [f"{'task':<{width}}  {'metric':<12} value", f"{'-' * width}  {'-' * 12} -----"]
    lines += [f"{n:<{width}}  {m:<12} {v:.4f}" for n, m, v in rows]
    return "\n".join(lines)
