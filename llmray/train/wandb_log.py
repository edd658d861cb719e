"""A training run as a W&B run, logged by rank 0 only: the recipe as its config, every report's numbers as its
history. The run id is derived from the run's name and storage, so a run that restarts after a lost worker, or
a rerun that continues it, keeps appending to the same W&B run."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

from llmray import storage
from llmray.recipe.schema import Recipe


def wandb_env() -> dict[str, str]:
    """What the workers need from the driver to reach W&B (Ray starts them without the driver's environment)."""
    return {k: v for k, v in os.environ.items() if k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL")}


def run_id(recipe: Recipe) -> str:
    where = storage.join(recipe.run.storage_path, recipe.run.name)
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", recipe.run.name)[:40]
    return f"{slug}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def local_dir(recipe: Recipe) -> str:
    """The run folder when it is local (beside its checkpoints), else a local scratch folder."""
    if storage.is_uri(recipe.run.storage_path):
        path = os.path.join(tempfile.gettempdir(), "llmray-wandb")
    else:
        path = storage.resolve(storage.join(recipe.run.storage_path, recipe.run.name))[1]
    os.makedirs(path, exist_ok=True)
    return path


class WandbSink:
    """Wraps the loop's metrics sink: rank 0 logs every report to W&B (unthrottled), then passes it on."""

    def __init__(self, inner, recipe: Recipe, rank: int):
        self.inner, self.run = inner, None
        w = recipe.wandb
        if rank != 0 or w.project is None:
            return
        import wandb

        mode = w.mode if w.mode != "auto" else os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=w.tags or None,
                              name=recipe.run.name, id=run_id(recipe), resume="allow", job_type="train",
                              config=recipe.model_dump(mode="json"), dir=local_dir(recipe), mode=mode)
        if mode == "offline":
            print(f"[llmray] W&B offline: wandb sync {self.run.dir.rsplit('/files', 1)[0]}", flush=True)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                         step=int(metrics["step"]))
        self.inner.report(metrics, checkpoint_dir=checkpoint_dir)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
