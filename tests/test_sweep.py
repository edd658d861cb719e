"""Sweeps for real: W&B-format sweep files checked before Ray starts; a grid of whole Ray Train + DeepSpeed trials on
Ray Tune, interrupted (SIGKILL of the driver) and resumed, with one trial that fails at run time; W&B in offline mode,
its run files read back; leaderboard, CSV/JSON, plot, and the best trial exported."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from wandb_files import read_run

from llmray.sweep.spec import SweepError, load_sweep

SMALL = ["data.seq_len=64", "model.hidden_size=64", "model.num_layers=2", "train.micro_batch_size=4",
         "train.warmup_steps=2", "train.log_every=2", "train.eval_batches=2", "train.sample_prompt=null",
         "data.val_fraction=0.2", "quant.method=ptq"]


def sweep_file(tmp_path, corpus, **changes) -> Path:
    raw = {
        "name": "grid", "project": "llmray-tests", "method": "grid",
        "metric": {"name": "quant_ppl", "goal": "minimize"},
        "parameters": {"train.lr": {"values": [1e-2, 3e-3]}, "quant.scheme": {"value": "int8-dynamic"},
                       "train.global_batch_size": {"values": [8]}},
        "llmray": {"recipe": str(Path(__file__).parents[1] / "jobs" / "pretrain_tiny.yaml"),
                   "overrides": [f"data.shards={corpus['shards']}", f"data.tokenizer={corpus['tokenizer']}", *SMALL],
                   "budget": {"steps": 8}, "workers": 2, "storage_path": str(tmp_path / "sweeps")},
    }
    for key, value in changes.items():
        node = raw
        *path, last = key.split("/")
        for part in path:
            node = node[part]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("change,message", [
    ({"parameters/train.lrr": {"values": [1e-3]}}, "parameters.train.lrr: 'lrr' is not a key of train"),
    ({"parameters/model.widht": {"values": [64]}}, "parameters.model.widht: 'widht' is not a key of model"),
    ({"parameters/train.lr": {"distribution": "gaussian", "mu": 0, "sigma": 1}},
     "distribution 'gaussian' is not one W&B defines (constant, categorical, int_uniform"),
    ({"parameters/train.global_batch_size": {"values": [8, 12]}},
     "parameters train.lr=0.01, quant.scheme=int8-dynamic, train.global_batch_size=12: invalid recipe: "
     "train.global_batch_size=12 is not a multiple of train.micro_batch_size * scaling.num_workers = 4 * 2 = 8"),
    ({"method": "random", "run_cap": 2,
      "parameters/train.global_batch_size": {"distribution": "int_uniform", "min": 8, "max": 64}},
     "parameters.train.global_batch_size: use `values`"),
    ({"parameters/train.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}},
     "parameters.train.lr: grid search needs `values`"),
    ({"method": "random"}, "run_cap: method random draws trials until run_cap"),
    ({"earl_terminate": {"type": "hyperband"}}, "earl_terminate: unknown key"),
    ({"metric": {"name": "val_pplx"}}, "metric.name: 'val_pplx' is not reported by trials"),
    ({"llmray/overrides": ["quant.method=none"]}, "parameters sweep quant.* but the recipe's quant.method is none"),
    ({"llmray/budget": {"steps": 8, "tokens": 100}}, "llmray.budget: give exactly one of steps or tokens"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 2}},
     "early_terminate: hyperband compares trials while they train, but quant_ppl is known only when a trial ends"),
])
def test_bad_sweep_files_are_refused_naming_the_parameter(corpus, tmp_path, change, message):
    path = sweep_file(tmp_path, corpus, **change)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value)
    assert not (tmp_path / "sweeps").exists()  # nothing started


def test_methods_map_to_ray_tune(corpus, tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from llmray.sweep.run import concurrent_trials, search_space, tune_config

    grid = load_sweep(sweep_file(tmp_path, corpus, run_cap=1))
    assert grid.grid() == [{"train.lr": 1e-2, "quant.scheme": "int8-dynamic", "train.global_batch_size": 8}]
    config = tune_config(grid, concurrent=2)
    assert isinstance(config.search_alg, BasicVariantGenerator) and config.num_samples == 1
    assert config.search_alg.max_concurrent == 2  # Tune would ignore max_concurrent_trials for this generator
    bayes = load_sweep(sweep_file(tmp_path, corpus, method="bayes", run_cap=5, metric={"name": "val_ppl"}, **{
        "parameters/train.lr": {"distribution": "log_uniform", "min": -9.2, "max": -4.6},
        "early_terminate": {"type": "hyperband", "min_iter": 2000, "eta": 2}, "llmray/budget": {"tokens": 8192}}))
    config = tune_config(bayes, concurrent=3)
    assert isinstance(config.search_alg, ConcurrencyLimiter) and config.search_alg.max_concurrent == 3
    assert isinstance(config.search_alg.searcher, OptunaSearch) and config.num_samples == 5
    assert isinstance(config.scheduler, ASHAScheduler)
    assert config.scheduler._time_attr == "tokens" and config.scheduler._max_t == 8192
    lr = search_space(bayes)["train.lr"]
    assert lr.lower == pytest.approx(math.exp(-9.2)) and lr.upper == pytest.approx(math.exp(-4.6))  # W&B: exponents
    # "auto": whole trials the cluster holds, a CPU per worker plus one for tokenizing (at least one)
    assert concurrent_trials(bayes, {"CPU": 16}) == 5 and concurrent_trials(bayes, {"CPU": 2}) == 1
    trial = bayes.trial_recipe({"train.lr": 1e-3, "quant.scheme": "int8-dynamic", "train.global_batch_size": 8},
                               str(tmp_path), "t")
    assert trial.train.max_steps == 16 and trial.train.lr == 1e-3  # a token budget: 8192 / (8 x 64) steps


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(900)
def test_grid_sweep_survives_interruption_and_lands_in_wandb(corpus, ray_cluster, tmp_path, capsys, monkeypatch):
    """3 trials; the one with 3 KV heads for 4 attention heads fails inside the workers. The sweep's driver is
    SIGKILLed once the first trial is done; `llmray tune` again resumes it without rerunning that trial."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = sweep_file(tmp_path, corpus, **{
        "parameters/train.lr": {"values": [1e-2, 3e-3]}, "parameters/model.num_kv_heads": {"values": [4, 3]},
        "run_cap": 3})
    spec = load_sweep(path)
    sweep_dir = tmp_path / "sweeps" / "grid"

    # 1. The sweep as a job would run it, in its own process on this cluster; killed after its first trial.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = (tmp_path / "first-run.log").open("w")  # read it when this test fails
    proc = subprocess.Popen([sys.executable, "-m", "llmray.cli", "tune", str(path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def first_done():
        return any('"completed": true' in p.read_text() for p in sweep_dir.glob("*/result.json"))

    try:
        wait_for(first_done, 400, "the first trial to finish")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # 2. Rerun: the sweep resumes.
    from llmray.sweep.run import run_sweep

    out = run_sweep(spec)
    printed = capsys.readouterr().out
    assert "resuming sweep grid" in printed and "sweep grid: quant_ppl (minimize)" in printed
    rows = json.loads(Path(out["json"]).read_text())
    assert len(rows) == 3 and out["failed"] == 1
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed[0]["model.num_kv_heads"] == 3 and failed[0]["train.lr"] == 1e-2
    done = [r for r in rows if r["status"] == "completed"]
    assert [r["quant_ppl"] for r in done] == sorted(r["quant_ppl"] for r in done)  # best first
    assert all(r["quant_ppl"] > 1 and r["step"] == 8 for r in done)
    assert Path(out["csv"]).read_text().count("\n") == 4 and Path(out["plot"]).stat().st_size > 5000
    best = Path(out["best"])
    assert json.loads((best / "quant_report.json").read_text())["scheme"] == "int8-dynamic"
    assert out["best_trial"] == done[0]["trial"]

    # 3. W&B, offline, for real: one run per trial in the project, grouped under the sweep; swept values as config.
    runs = [read_run(f) for f in sweep_dir.glob("wandb/offline-run-*/run-*.wandb")]
    runs = [r for r in runs if r["run"]]  # the run the SIGKILL cut off before W&B wrote anything
    by_trial = {}
    for run in runs:
        assert run["run"]["project"] == "llmray-tests" and run["run"]["group"] == "grid"
        by_trial.setdefault(run["run"]["id"], []).append(run)
    assert len(by_trial) == 3
    completed = [r for r in runs if "quant_ppl" in r["summary"]]
    assert len(completed) == 2
    for run in completed:
        assert {"train.lr", "model.num_kv_heads", "quant.scheme"} <= set(run["config"])
        row = next(r for r in rows if r["train.lr"] == run["config"]["train.lr"]
                   and r["model.num_kv_heads"] == run["config"]["model.num_kv_heads"])
        assert run["summary"]["quant_ppl"] == pytest.approx(row["quant_ppl"])
        assert run["summary"]["val_ppl"] > 1 and run["summary"]["quant_weights_bytes"] > 0
        assert any("loss" in h and "tokens_per_s" in h for h in run["history"])  # rank 0's reports during training
    # 4. Run again: everything is finished, nothing reruns.
    again = run_sweep(spec)
    assert json.loads(Path(again["json"]).read_text()) == rows


@pytest.mark.timeout(600)
def test_hyperband_sweep_on_object_storage_stops_weak_trials(corpus, ray_cluster, s3, tmp_path, capsys, monkeypatch):
    """early_terminate hyperband → ASHA on steps: the good learning rate runs to the budget; the two that barely move
    are stopped at the first rung (step 4 of 12). storage_path is on a real S3 server, as a cluster needs it: Tune's
    state, the trials' Train checkpoints and the results land there, and a rerun finds the finished sweep there."""
    import boto3

    from llmray.sweep.run import run_sweep

    path = sweep_file(tmp_path, corpus, name="asha", metric={"name": "val_ppl"}, **{
        "parameters/train.lr": {"values": [3e-3, 1e-5, 3e-6]}, "llmray/budget": {"steps": 12},
        "early_terminate": {"type": "hyperband", "min_iter": 4, "eta": 3},
        "llmray/storage_path": "s3://llmray/sweeps"})
    monkeypatch.chdir(tmp_path)  # a remote sweep writes what people read under ./sweeps/<name> first
    spec = load_sweep(path)
    out = run_sweep(spec)
    rows = json.loads(Path(out["json"]).read_text())
    by_lr = {r["train.lr"]: r for r in rows}
    assert by_lr[3e-3]["status"] == "completed" and by_lr[3e-3]["step"] == 12
    for lr in (1e-5, 3e-6):
        assert by_lr[lr]["status"] == "stopped early" and by_lr[lr]["step"] < 12
    assert rows[0]["train.lr"] == 3e-3 and out["best_trial"] == rows[0]["trial"]
    assert rows[0]["checkpoint_dir"].startswith("s3://llmray/sweeps/asha/trials/")

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="llmray", Prefix="sweeps/")["Contents"]}
    assert "sweeps/asha/tuner.pkl" in keys and any(k.startswith("sweeps/asha/experiment_state") for k in keys)
    assert {"sweeps/asha/results/results.json", "sweeps/asha/results/best/config.json"} <= keys
    assert Path(tmp_path, "sweeps", "asha", "results.json").is_file()
    capsys.readouterr()
    again = run_sweep(spec)
    assert "resuming sweep asha" in capsys.readouterr().out
    assert json.loads(Path(again["json"]).read_text()) == rows


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load(path, capsys):
    from llmray.cli import main

    spec = load_sweep(path)
    assert spec.parameters and spec.llmray.budget.amount > 0
    main(["tune", str(path), "--dry-run"])
    printed = capsys.readouterr().out
    assert all(key in printed for key in spec.parameters)
