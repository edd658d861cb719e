"""`llmray tune`: a sweep file → Ray Tune trials, each a whole Ray Train + DeepSpeed run → W&B runs of one sweep.

    grid    → the grid's combinations as Tune's points to evaluate (capped at run_cap, in file order)
    random  → Tune's random sampling of the search space, run_cap samples
    bayes   → Optuna's TPE through Ray Tune (OptunaSearch), run_cap samples
    hyperband (early_terminate) → ASHA on the budget's unit (steps or tokens)

Each trial is the Train V2 pattern: a driver function that builds the TorchTrainer (llmray's `fit`) with
`TuneReportCallback`, so rank 0's reports reach Tune, and Tune's `WandbLoggerCallback` logs them as the trial's W&B run.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from llmray import hub, storage
from llmray import metric_names as M
from llmray.cluster import ensure_ray
from llmray.sweep.spec import SweepError, SweepSpec

DRIVER_CPU = 0.01  # what each trial's driver function holds; its TorchTrainer budgets from the rest
TRIALS_DIR = "trials"  # under the sweep folder: one Ray Train run folder per trial


def search_space(spec: SweepSpec) -> dict[str, Any]:
    """Each swept key as a Ray Tune domain (flat, dotted keys: what W&B shows as the run's config)."""
    space = {}
    for key, p in spec.parameters.items():
        d = p.distribution
        if d == "constant":
            space[key] = p.value
        elif d == "categorical":
            space[key] = tune.choice(p.values)
        elif d == "int_uniform":
            space[key] = tune.randint(int(p.min), int(p.max) + 1)  # W&B's max is inclusive
        elif d == "uniform":
            space[key] = tune.uniform(p.min, p.max)
        elif d == "q_uniform":
            space[key] = tune.quniform(p.min, p.max, p.q or 1.0)
        elif d == "log_uniform":  # W&B: bounds are natural-log exponents
            space[key] = tune.loguniform(math.exp(p.min), math.exp(p.max))
        elif d == "log_uniform_values":
            space[key] = tune.loguniform(p.min, p.max)
        elif d == "q_log_uniform":
            space[key] = tune.qloguniform(math.exp(p.min), math.exp(p.max), p.q or 1.0)
        elif d == "q_log_uniform_values":
            space[key] = tune.qloguniform(p.min, p.max, p.q or 1.0)
        elif d == "normal":
            space[key] = tune.randn(p.mu, p.sigma)
        elif d == "q_normal":
            space[key] = tune.qrandn(p.mu, p.sigma, p.q or 1.0)
        else:
            raise SweepError(f"parameters.{key}: distribution {d} is not supported")
    return space


def tune_config(spec: SweepSpec, concurrent: int = 1) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    metric, mode = spec.metric.name, spec.metric.mode
    if spec.method == "grid":
        points = spec.grid()
        search, samples = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrent), len(points)
    elif spec.method == "random":
        search, samples = BasicVariantGenerator(random_state=0, max_concurrent=concurrent), spec.run_cap
    else:
        from ray.tune.search import ConcurrencyLimiter

        search, samples = ConcurrencyLimiter(OptunaOnMetricReports(metric=metric, mode=mode, seed=0), concurrent), spec.run_cap
    scheduler = FIFOScheduler()
    et = spec.early_terminate
    if et is not None:
        scheduler = ASHAScheduler(time_attr=spec.llmray.budget.unit, max_t=spec.llmray.budget.amount,
                                  grace_period=et.grace_period, reduction_factor=et.eta, brackets=1,
                                  stop_last_trials=et.strict)
    # The limit lives in the search algorithm: Tune ignores max_concurrent_trials for an explicit generator.
    return tune.TuneConfig(metric=metric, mode=mode, search_alg=search, scheduler=scheduler, num_samples=samples,
                           reuse_actors=False)


class OptunaOnMetricReports(OptunaSearch):
    """Optuna's TPE through Ray Tune, shown only the reports that carry the metric: a quantized perplexity exists
    only in a trial's last report, and OptunaSearch reads the metric from every report."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def trial_main(config: dict, spec_json: dict, base: dict, sweep_dir: str, cpus_per_trial: float | None,
               driver_env: dict[str, str]) -> None:
    """One trial: the recipe with this trial's values, trained by Ray Train, then (for a quantizing recipe) exported
    quantized with its report. Runs as a Tune function trainable; its TorchTrainer reports through
    TuneReportCallback, and the last report adds what only the end knows (quantized perplexity and size)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from llmray.export.folder import export
    from llmray.prune.recover import with_pruned_model
    from llmray.train.trainer import fit

    os.environ.update(driver_env)  # the trial reaches the object store and the Hub as the driver does
    spec = SweepSpec.model_validate(spec_json)
    context = tune.get_context()
    params = {k: config[k] for k in spec.parameters}
    recipe = spec.trial_recipe(params, storage.join(sweep_dir, TRIALS_DIR), context.get_trial_id(), base)
    summary = fit(with_pruned_model(recipe), callbacks=[TuneReportCallback()], cpus_available=cpus_per_trial)
    final = {M.STEP: summary.steps, M.TOKENS: summary.tokens, M.LOSS: summary.final_loss, M.VAL_LOSS: summary.val_loss,
             M.VAL_PPL: summary.val_ppl, M.TOKENS_PER_S: summary.tokens_per_s, "checkpoint_dir": summary.checkpoint,
             "completed": True,  # Tune's own "done" is also set on trials its scheduler stopped
             **(summary.evals or {}),
             **{M.per_source(M.VAL_LOSS, k): v for k, v in (summary.val_loss_per_source or {}).items()}}
    if recipe.quant.method != "none" and summary.checkpoint:
        report = export(summary.checkpoint, str(Path(context.get_trial_dir(), "export")), overwrite=True)["quant_report"]
        a = report["after"]
        final.update({M.QUANT_PPL: a["ppl"], M.QUANT_LOSS: a["loss"], M.QUANT_WEIGHTS_BYTES: a["weights_bytes"],
                      M.QUANT_SIZE_RATIO: report["size_ratio"], M.QUANT_TOKENS_PER_S: a["tokens_per_s"],
                      "export_dir": report["out"]})
    tune.report({k: v for k, v in final.items() if v is not None})


def wandb_callback(spec: SweepSpec, sweep_id: str | None, wandb_dir: Path):
    from ray.air.integrations.wandb import WandbLoggerCallback

    # W&B writes straight into the local results folder: Tune's copy of a trial's folder is taken when the trial ends,
    # before the logging actor has finished the run file, so that copy of the last trial's run was cut short.
    kwargs: dict[str, Any] = {"job_type": "trial", "tags": [spec.name, spec.method], "dir": str(wandb_dir)}
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        kwargs["mode"] = os.environ["WANDB_MODE"]  # the logging actors do not inherit the driver's environment
    if spec.entity:
        kwargs["entity"] = spec.entity
    if sweep_id:
        import wandb

        kwargs["settings"] = wandb.Settings(sweep_id=sweep_id)  # the run shows on the sweep's dashboard
    # Tune's bookkeeping stays out of the W&B run; the swept keys are its config.
    return WandbLoggerCallback(project=spec.project, group=spec.name, log_config=False, upload_checkpoints=False,
                               excludes=["checkpoint_dir", "export_dir", "completed"], **kwargs)


def concurrent_trials(spec: SweepSpec, cluster: dict[str, float]) -> int:
    """Trials at once: the sweep file's number, or ("auto") as many whole trials as the cluster holds — by GPUs
    for a GPU recipe, else by CPUs at one per worker plus one for the trial's tokenize tasks."""
    if spec.llmray.max_concurrent_trials != "auto":
        return spec.llmray.max_concurrent_trials
    s = spec.first_recipe().scaling
    if s.use_gpu:
        return max(1, int(cluster.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    per_worker = 1.0 if s.cpus_per_worker == "auto" else float(s.cpus_per_worker)
    return max(1, int(cluster.get("CPU", 1) // (s.num_workers * per_worker + 1)))


def wandb_mode() -> str:
    """online when an API key is at hand; otherwise offline (set for this process and its trials), said once."""
    mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import wandb

        if wandb.Api(timeout=5).api_key:
            return "online"
    except Exception:  # no netrc entry, no network: both mean offline
        pass
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def wandb_sweep(spec: SweepSpec) -> str | None:
    """Online: create the W&B sweep the trials' runs join, so its dashboard (parallel coordinates, parameter
    importance) shows them. Its controller is `local`: Ray Tune, not W&B, picks the trials."""
    import wandb

    config = {**spec.wandb_config(), "controller": {"type": "local"}}
    return wandb.sweep(sweep=config, project=spec.project, entity=spec.entity)


def places(spec: SweepSpec) -> tuple[str, str, Path]:
    """(storage root, the sweep's folder there, the local folder for what people read). The storage may be an
    object store (s3://, gs://): on a cluster it must be, so a trial's Train workers on several nodes checkpoint into
    one place and a resumed sweep finds its trials. What people read (tables, plot, best export, offline W&B runs)
    is written locally first, under ./sweeps/<name> for a remote store, and copied beside the sweep's state."""
    if storage.is_uri(spec.llmray.storage_path):
        root = spec.llmray.storage_path.rstrip("/")
        return root, storage.join(root, spec.name), Path("sweeps", spec.name).resolve()
    root = str(Path(spec.llmray.storage_path).expanduser().resolve())
    return root, str(Path(root, spec.name)), Path(root, spec.name)


def run_sweep(spec: SweepSpec) -> dict:
    """Run (or resume) the sweep; returns where its results went."""
    from llmray.export.folder import export
    from llmray.sweep.results import leaderboard, plot, trial_rows, write_tables

    # Training reports carry loss and (when evaluating) val_*; quant_* arrive with a trial's last report. Tune would
    # otherwise stop the sweep at the first report without the metric (spec.check has already checked its name).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    ensure_ray()
    root, sweep_dir, local = places(spec)
    local.mkdir(parents=True, exist_ok=True)
    fs, root_path = storage.resolve(root)
    tune_fs = fs if storage.is_uri(root) else None
    mode = wandb_mode()
    cluster = ray.cluster_resources()
    concurrent = concurrent_trials(spec, cluster)
    sweep_id = wandb_sweep(spec) if mode == "online" else None
    # The trial's function only waits on its TorchTrainer: a token CPU (Tune refuses an empty request).
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, spec_json=spec.model_dump(mode="json"), base=spec.base_raw(),
                             sweep_dir=sweep_dir,
                             cpus_per_trial=cluster.get("CPU", 1) / concurrent - DRIVER_CPU,
                             driver_env={**(storage.credentials_env() if storage.is_uri(root) else {}),
                                          **hub.env()}),
        {"cpu": DRIVER_CPU})
    run_config = tune.RunConfig(name=spec.name, storage_path=root_path, storage_filesystem=tune_fs,
                                callbacks=[wandb_callback(spec, sweep_id, local)],
                                failure_config=tune.FailureConfig(max_failures=0), verbose=1)
    state = posixpath.join(root_path, spec.name)
    if tune.Tuner.can_restore(state, storage_filesystem=tune_fs):
        print(f"[llmray] resuming sweep {spec.name} from {sweep_dir}: finished trials are kept, unfinished ones "
              "continue from their last checkpoint", flush=True)
        tuner = tune.Tuner.restore(state, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space=search_space(spec), storage_filesystem=tune_fs)
    else:
        print(f"[llmray] sweep {spec.name}: {spec.method} over {', '.join(spec.parameters)}"
              f"{', ASHA on ' + spec.llmray.budget.unit if spec.early_terminate else ''}; "
              f"{concurrent} trial(s) at a time; W&B {mode} (project {spec.project}, "
              f"group {spec.name})", flush=True)
        tuner = tune.Tuner(trainable, param_space=search_space(spec), tune_config=tune_config(spec, concurrent),
                           run_config=run_config)
    grid = tuner.fit()
    rows = trial_rows(spec, grid)
    csv_path, json_path = write_tables(rows, local)
    png = plot(spec, rows, local)
    print(leaderboard(spec, rows), flush=True)
    out = {"sweep_dir": sweep_dir, "results_dir": str(local), "csv": str(csv_path), "json": str(json_path),
           "plot": str(png) if png else None, "trials": len(rows),
           "failed": sum(r["status"] == "failed" for r in rows), "wandb": mode, "wandb_sweep_id": sweep_id}
    best = next((r for r in rows if r["status"] != "failed" and r.get("checkpoint_dir")), None)
    if best is not None and spec.llmray.export_best:
        info = export(best["checkpoint_dir"], str(local / "best"), overwrite=True)
        out.update(best_trial=best["trial"], best=str(local / "best"), best_metric=best.get(spec.metric.name))
        print(f"[llmray] best trial {best['trial']} ({spec.metric.name} {best.get(spec.metric.name):.4g}) exported "
              f"to {info['out']}", flush=True)
    if mode == "offline":
        print(f"[llmray] W&B ran offline (no API key). To upload: wandb sync {local}/wandb/offline-run-*", flush=True)
    Path(local, "sweep.json").write_text(json.dumps(out, indent=1))
    if storage.is_uri(root):  # what people read goes beside the sweep's state, too
        storage.upload(str(local), storage.join(sweep_dir, "results"))
        print(f"[llmray] results copied to {storage.join(sweep_dir, 'results')}", flush=True)
    return out
