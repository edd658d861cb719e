"""Real Ray Train + real DeepSpeed (CPU, gloo) on a tiny Llama."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import losses, read_run, tiny

from llmray.train.checkpoint import STATE_FILE, TAG, read_state

pytestmark = pytest.mark.ray


def test_zero_stages_and_world_sizes_agree(zero_runs):
    """Same seed, same global batch: 1 worker ZeRO-0 and 2 workers ZeRO-2 / ZeRO-3 give the same losses; so do
    compiled decoder blocks with every other block's activations recomputed, and ZeRO-3's partitioned
    construction (the same initial weights as a whole build). The runs (tests/e2e/conftest.py) are shared with
    test_eval.py: the 2-worker ones also evaluate tasks while training, which must leave the losses as they are."""
    ref = losses(zero_runs[0])
    assert len(ref) == 4 and ref[-1] < ref[0]  # it learns
    np.testing.assert_allclose(losses(zero_runs[2]), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses(zero_runs[3]), ref, rtol=1e-5, atol=1e-5)


def test_pretrain_end_to_end(corpus, ray_cluster, tmp_path, capsys):
    from llmray.cli import main

    rc = main(["train", "jobs/pretrain_tiny.yaml", f"data.shards={corpus['shards']}",
               f"data.tokenizer={corpus['tokenizer']}", f"run.storage_path={tmp_path}", "run.name=e2e",
               "data.seq_len=64", "model.hidden_size=64", "model.num_layers=2", "train.micro_batch_size=4",
               "train.global_batch_size=16", "train.max_steps=6", "train.log_every=2", "train.eval_every=3",
               "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.zero_stage=3",
               "data.val_fraction=0.2", "train.eval_batches=2", "train.sample_tokens=8",
               "wandb.project=llmray-tests", "wandb.group=e2e-group"])
    assert rc == 0
    out = capsys.readouterr().out
    run = tmp_path / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 16 * 64
    assert summary["val_ppl"] > 1 and summary["sample"].startswith("def")
    assert (run / "loss.png").stat().st_size > 5000
    assert "loss plot" in out and "6 steps" in out
    assert "ZeRO-3: the model was built partitioned (0 of " in out  # no rank held it whole
    ckpts = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2  # keep-last-2 of the checkpoints at steps 2, 4, 6
    final = Path(summary["checkpoint"])
    assert final in ckpts and read_state(final).step == 6
    assert (final / STATE_FILE).is_file() and (final / "latest").read_text() == TAG
    shards = sorted(p.name for p in (final / TAG).iterdir())
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards)
    history = read_state(final).history
    assert [h["step"] for h in history] == [2, 4, 6]
    assert all(h["tokens_per_s"] > 0 and 0 <= h["data_wait_share"] < 1 for h in history)
    assert "val_loss" in history[-1]

    # W&B (offline, for real): one run, logged by rank 0 only, with the recipe as config and every report's numbers.
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    logged = read_run(files[0])
    assert logged["run"]["project"] == "llmray-tests" and logged["run"]["group"] == "e2e-group"
    assert logged["run"]["name"] == "e2e" and logged["exit"] == 0
    assert logged["config"]["train"]["max_steps"] == 6 and logged["config"]["train"]["zero_stage"] == 3
    steps = [h for h in logged["history"] if "loss" in h]
    assert [h["_step"] for h in steps] == [2, 4, 6]
    assert [h["loss"] for h in steps] == pytest.approx([h["loss"] for h in history])
    assert steps[-1]["val_ppl"] == pytest.approx(summary["val_ppl"]) and steps[-1]["tokens_per_s"] > 0


@pytest.fixture(scope="module")
def blend_run(corpus, ray_cluster, tmp_path_factory):
    """`llmray train` as a user runs it (joined to this session's cluster), on a recipe file blending two weighted
    sources (3:1), 4 steps, evaluating and checkpointing every 2. One run for the two tests below: one reads its log,
    the other what it reports of each source."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from llmray.data.corpus import list_shards

    tmp_path = tmp_path_factory.mktemp("blend")
    parts = {}
    for name, shard in zip(("lib", "mail"), list_shards(corpus["shards"])[:2]):
        (tmp_path / name).mkdir()
        pq.write_table(pq.read_table(shard.path), tmp_path / name / "shard-00000.parquet")
        parts[name] = str(tmp_path / name)
    raw = tiny(corpus, tmp_path, "run.name=blend", "train.max_steps=4", "train.log_every=2", "train.eval_every=2",
               "train.checkpoint_every=2", "data.val_fraction=0.2").model_dump(mode="json")
    raw["data"].pop("shards")
    raw["data"]["sources"] = [{"name": "lib", "shards": parts["lib"], "weight": 3},
                              {"name": "mail", "shards": parts["mail"], "weight": 1}]
    recipe = tmp_path / "blend.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-m", "llmray.cli", "train", str(recipe)],
                         capture_output=True, text=True, timeout=300, env=env)
    return {"out": out, "log": out.stdout + out.stderr, "run": tmp_path / "blend"}


def test_a_runs_log_is_its_progress_lines_once_each(blend_run):
    """Each progress line once, the summary, and none of the frameworks' per-report, per-dataset or per-kernel
    chatter."""
    out, log = blend_run["out"], blend_run["log"]
    assert out.returncode == 0, log[-3000:]
    for step in (2, 4):
        assert sum(f"[llmray] step {step}/4 |" in line for line in log.splitlines()) == 1, log[-3000:]
    assert "trained    4 steps" in out.stdout
    for noise in ("Reporting training result", "Progress bars disabled", "Starting execution of Dataset",
                  "is not writable", "Detected no triton", "built successfully", "Setting up process group",
                  "constructor arguments in the object store",  # Ray's error line for a restartable actor's args
                  "is deprecated in Ray"):
        assert noise not in log, noise


def test_a_blend_trains_and_reports_each_sources_validation(blend_run):
    """Two weighted sources: the run reports val_loss/<source> for each, beside the weight-averaged val_loss, in its
    reports (what W&B and Tune receive) and its summary."""
    assert blend_run["out"].returncode == 0, blend_run["log"][-3000:]
    summary = json.loads((blend_run["run"] / "summary.json").read_text())
    per_source = summary["val_loss_per_source"]
    assert set(per_source) == {"lib", "mail"}
    assert summary["val_loss"] == pytest.approx(0.75 * per_source["lib"] + 0.25 * per_source["mail"])
    history = read_state(summary["checkpoint"]).history
    assert {"val_loss/lib", "val_ppl/lib", "val_loss/mail", "val_ppl/mail"} <= set(history[-1])
    printed = blend_run["out"].stdout
    text = printed[printed.index("trained    4 steps"):]  # the run's summary, as `llmray train` prints it
    assert "lib " in text and "mail " in text
