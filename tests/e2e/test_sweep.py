"""Sweeps for real: a grid of whole Ray Train + DeepSpeed trials on Ray Tune, interrupted (SIGKILL of the driver) and
resumed, with one trial that fails at run time; W&B in offline mode, its run files read back; leaderboard, CSV/JSON,
plot, and the best trial exported; a hyperband sweep on object storage. The checks sweep files get before Ray starts
are in tests/unit/test_sweep_spec.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_run, sweep_file, wait_for

from llmray.sweep.spec import load_sweep

pytestmark = pytest.mark.ray


@pytest.mark.timeout(900)
def test_grid_sweep_survives_interruption_and_lands_in_wandb(corpus, ray_cluster, tmp_path, capsys, monkeypatch):
    """2 trials of the grid's 4 (run_cap); the second, with 3 KV heads for 4 attention heads, fails inside the workers.
    The sweep's driver is SIGKILLed once the first trial is done; `llmray tune` again resumes it without rerunning that
    trial. (How completed trials rank, best first, is tests/unit/test_sweep_spec.py's; a second completed trial here
    would be one more whole trial for that.)"""
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = sweep_file(tmp_path, corpus, **{
        "parameters/train.lr": {"values": [1e-2, 3e-3]}, "parameters/model.num_kv_heads": {"values": [4, 3]},
        "run_cap": 2})
    spec = load_sweep(path)
    sweep_dir = tmp_path / "sweeps" / "grid"

    # 1. The sweep as a job would run it, in its own process on this cluster; killed after its first trial.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = (tmp_path / "first-run.log").open("w")  # read it when this test fails
    proc = subprocess.Popen([sys.executable, "-m", "llmray.cli", "tune", str(path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def first_done():
        """The trial reported its end, and Tune's saved experiment state knows it (Tune writes that state a moment
        later; killed in between, the resumed sweep reruns the trial)."""
        return any('"completed": true' in p.read_text() for p in sweep_dir.glob("*/result.json")) and \
            any("TERMINATED" in p.read_text() for p in sweep_dir.glob("experiment_state-*.json"))

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
    assert len(rows) == 2 and out["failed"] == 1
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed[0]["model.num_kv_heads"] == 3 and failed[0]["train.lr"] == 1e-2
    done = [r for r in rows if r["status"] == "completed"]
    assert [r["status"] for r in rows] == ["completed", "failed"]  # ranked: failed trials last
    assert len(done) == 1 and done[0]["model.num_kv_heads"] == 4 and done[0]["train.lr"] == 1e-2
    assert all(r["quant_ppl"] > 1 and r["step"] == 8 for r in done)
    assert Path(out["csv"]).read_text().count("\n") == 3 and Path(out["plot"]).stat().st_size > 5000
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
    assert len(by_trial) == 2
    completed = [r for r in runs if "quant_ppl" in r["summary"]]
    assert len(completed) == 1  # the first trial ran once: the resumed sweep did not run it again
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
    """early_terminate hyperband → ASHA on steps: the good learning rate runs to the budget; the one that barely moves
    is stopped at the first rung (step 4 of 12); a second weak trial would be one more whole trial (~45 s) for the same
    check. storage_path is on a real S3 server, as a cluster needs it: Tune's state, the trials' Train checkpoints and
    the results land there, and a rerun finds the finished sweep there."""
    import boto3

    from llmray.sweep.run import run_sweep

    path = sweep_file(tmp_path, corpus, name="asha", metric={"name": "val_ppl"}, **{
        "parameters/train.lr": {"values": [3e-3, 1e-5]}, "llmray/budget": {"steps": 12},
        "early_terminate": {"type": "hyperband", "min_iter": 4, "eta": 3},
        "llmray/storage_path": "s3://llmray/sweeps"})
    monkeypatch.chdir(tmp_path)  # a remote sweep writes what people read under ./sweeps/<name> first
    spec = load_sweep(path)
    out = run_sweep(spec)
    rows = json.loads(Path(out["json"]).read_text())
    by_lr = {r["train.lr"]: r for r in rows}
    assert by_lr[3e-3]["status"] == "completed" and by_lr[3e-3]["step"] == 12
    assert len(rows) == 2 and by_lr[1e-5]["status"] == "stopped early" and by_lr[1e-5]["step"] < 12
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
