"""Exactly-once resume on a real local Ray cluster with real DeepSpeed (CPU, gloo): a killed worker, a rerun,
a resize, a truncated checkpoint, an incompatible recipe, and the export to Hugging Face.

Every run records the ids of the samples it trained on (train.record_samples), so each test can check that
the interrupted run saw exactly the samples of an uninterrupted one, in the same steps."""

import json
import os
import re
import shutil
import threading
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import kill_worker_when_checkpointed

from llmray.data.corpus import list_shards
from llmray.data.shard import shard_corpus
from llmray.recipe.load import load_recipe
from llmray.train.checkpoint import CheckpointError, CheckpointUploadError, list_checkpoints, read_state, verify
from llmray.train.trainer import fit

pytestmark = pytest.mark.ray

STEPS = 24
SHARDS = 3


@pytest.fixture(scope="module")
def small(corpus, tmp_path_factory):
    """~40 KB of the corpus in 3 shards: an epoch is ~13 steps, so a 24-step run crosses an epoch's end."""
    root = tmp_path_factory.mktemp("small")
    docs, size = [], 0
    for s in list_shards(corpus["shards"]):
        for text in pq.read_table(s.path, columns=["text"]).column(0).to_pylist():
            if size < 40_000 and len(text) < 8_000:
                docs.append(text)
                size += len(text)
    # ids of their own: a document's id decides whether it is held out, and the default (file path and line) would
    # make that split, and the size of the validation set, depend on the session's temporary folder
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": f"small-{i}", "text": t}) + "\n"
                                             for i, t in enumerate(docs)))
    shard_corpus([str(root / "docs.jsonl")], str(root / "shards"), shard_size="10KB")
    assert len(list_shards(str(root / "shards"))) == SHARDS
    return {"shards": str(root / "shards"), "tokenizer": corpus["tokenizer"], "root": root}


def recipe(small, storage, name, *overrides):
    return load_recipe("jobs/pretrain_tiny.yaml", [
        f"data.shards={small['shards']}", f"data.tokenizer={small['tokenizer']}", f"run.storage_path={storage}",
        f"run.name={name}", "data.seq_len=64", "model.hidden_size=64", "model.num_layers=2",
        "train.micro_batch_size=4", "train.global_batch_size=16", "train.schedule=constant", "train.warmup_steps=2",
        "train.lr=3e-3", "train.log_every=6", "train.eval_every=0", "train.eval_batches=1", "data.val_fraction=0.2",
        "train.sample_prompt=null", "train.record_samples=true", "train.checkpoint_every=6",
        "train.keep_checkpoints=2", f"train.max_steps={STEPS}", "scaling.num_workers=2", "train.zero_stage=2",
        *overrides])


def resumes(state):
    return [{k: r[k] for k in ("step", "world_size", "from_world_size")} for r in state.resumes]


def trace(summary_or_ckpt):
    path = summary_or_ckpt if isinstance(summary_or_ckpt, str) else summary_or_ckpt.checkpoint
    state = read_state(path)
    steps = state.trace
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    return state, np.array([s["loss"] for s in steps]), [s["samples"] for s in steps]


def assert_exactly_once(samples):
    """No sample twice within an epoch, and every completed epoch covers each shard's samples 0..n-1."""
    flat = [tuple(x) for step in samples for x in step]
    assert len(flat) == len(set(flat)) == STEPS * 16
    epochs = sorted({e for e, _, _ in flat})
    assert len(epochs) >= 2  # the run crossed an epoch boundary
    for e in epochs[:-1]:
        per_shard = Counter(p for ep, p, _ in flat if ep == e)
        for p in per_shard:
            got = sorted(s for ep, q, s in flat if ep == e and q == p)
            assert got == list(range(len(got))), f"epoch {e} shard position {p} skipped samples"
        assert sorted(per_shard) == list(range(SHARDS))  # every shard of the epoch was read


@pytest.fixture(scope="module")
def reference(small, ray_cluster, tmp_path_factory):
    """The uninterrupted run every resumed one is compared with: 2 workers, ZeRO-2, 24 steps."""
    storage = tmp_path_factory.mktemp("ref")
    summary = fit(recipe(small, storage, "ref"))
    state, losses, samples = trace(summary)
    assert len(losses) == STEPS and not state.resumes
    assert_exactly_once(samples)
    return {"summary": summary, "losses": losses, "samples": samples, "storage": storage}


def test_killed_worker_recovers_with_no_sample_lost_or_repeated(small, reference, tmp_path):
    killed: list[int] = []
    killer = threading.Thread(target=kill_worker_when_checkpointed, args=(tmp_path / "killed", killed), daemon=True)
    killer.start()
    summary = fit(recipe(small, tmp_path, "killed", "scaling.max_failures=1"))
    killer.join()
    assert killed, "no training worker was found to kill"
    state, losses, samples = trace(summary)
    assert summary.steps == STEPS and len(state.resumes) == 1
    assert state.resumes[0]["step"] in (6, 12, 18)  # restarted from a checkpoint, not from scratch
    np.testing.assert_allclose(losses, reference["losses"], rtol=0, atol=1e-6)
    assert samples == reference["samples"]
    assert_exactly_once(samples)


def test_rerun_continues_and_resizes_one_worker_to_two(small, reference, tmp_path, capsys):
    """ZeRO-3 shards of 1 rank, continued on 2 ranks through DeepSpeed's universal checkpoint (the other way, 2 ranks
    to 1, is the next test's, under ZeRO-2)."""
    first = fit(recipe(small, tmp_path, "resize", "train.zero_stage=3", "scaling.num_workers=1", "train.max_steps=12"))
    assert first.steps == 12
    with pytest.raises(CheckpointError, match=r"differs in model: .*'hidden_size': 64.*'hidden_size': 32"):
        fit(recipe(small, tmp_path, "resize", "train.zero_stage=3", "model.hidden_size=32"))
    with pytest.raises(CheckpointError, match="already has 2 checkpoint.*--fresh never overwrites"):
        fit(recipe(small, tmp_path, "resize", "train.zero_stage=3"), fresh=True)
    second = fit(recipe(small, tmp_path, "resize", "train.zero_stage=3"))
    assert "continuing run resize from its checkpoint at step 12" in capsys.readouterr().out
    state, losses, samples = trace(second)
    assert resumes(state) == [{"step": 12, "world_size": 2, "from_world_size": 1}]
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5, atol=1e-5)
    assert samples == reference["samples"]


def test_resume_from_another_runs_checkpoint_two_workers_to_one(small, reference, tmp_path):
    """A new run started from the reference run's step-18 checkpoint (ZeRO-2 shards of 2 ranks) on 1 rank: one run of
    6 steps, where a run of its own to start from would be 12 more."""
    (step, at_18), _ = list_checkpoints(reference["summary"].run_dir)
    assert step == 18
    second = fit(recipe(small, tmp_path, "one", "scaling.num_workers=1"), resume_from=at_18)
    state, losses, samples = trace(second)
    assert resumes(state) == [{"step": 18, "world_size": 1, "from_world_size": 2}]
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5, atol=1e-5)
    assert samples == reference["samples"]


def test_truncated_or_incomplete_checkpoint_is_refused(small, reference, tmp_path):
    good = reference["summary"].checkpoint
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    victim = next(p for p in sorted((truncated / "state").iterdir()) if "optim_states" in p.name)
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"truncated: state/{victim.name} has 100 of its"):
        fit(recipe(small, tmp_path, "t1"), resume_from=str(truncated))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(good, incomplete)
    (incomplete / "done" / "rank-1.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: rank 1's completion marker is missing"):
        fit(recipe(small, tmp_path, "t2"), resume_from=str(incomplete))
    assert [s for s, _ in list_checkpoints(reference["summary"].run_dir)] == [18, 24]  # keep-last-2


def test_export_loads_in_plain_transformers_with_the_engines_loss(small, reference, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray.cli import main
    from llmray.data.pack import StreamSpec, first_samples
    from llmray.data.split import Documents

    ckpt = reference["summary"].checkpoint
    out = tmp_path / "hf"
    assert main(["export", ckpt, "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    assert main(["export", ckpt, "--out", str(out)]) == 2  # never overwrites silently
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    # The run's last evaluation (2 ranks, a micro-batch of 4 held-out samples each) recomputed from the export.
    seed = recipe(small, tmp_path, "x").run.seed
    val = first_samples(StreamSpec.of([("corpus", 1.0, Documents(small["shards"], "val", 0.2))], small["tokenizer"], 64,
                                      seed, 512), 8)
    assert len(val) == 8, "the run validated on 2 ranks x 4 samples"
    with torch.no_grad():
        ids = torch.from_numpy(val).long()
        exported = np.mean([model(input_ids=ids[i:i + 4], labels=ids[i:i + 4]).loss.item() for i in (0, 4)])
    engine = read_state(ckpt).history[-1]["val_loss"]
    assert abs(exported - engine) < 1e-5
    sharded = tmp_path / "sharded"  # large models: model-0000k-of-n.safetensors and an index
    assert main(["export", ckpt, "--out", str(sharded), "--max-shard-size", "200KB", "--dtype", "bfloat16"]) == 0
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(sharded)
    assert reloaded.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(a.to(torch.bfloat16), b, msg=name)


def test_object_store_run_resumes_and_exports(small, reference, s3, tmp_path):
    import boto3

    first = fit(recipe(small, s3, "s3run", "train.max_steps=12"))
    assert first.checkpoint.startswith("s3://llmray/runs/s3run/checkpoint_")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="llmray")["Contents"]]
    assert any(k.endswith("done/rank-1.json") for k in keys) and "runs/s3run/summary.json" in keys
    second = fit(recipe(small, s3, "s3run"))  # the same run name and storage: continues from the bucket
    state, losses, samples = trace(second)
    assert resumes(state) == [{"step": 12, "world_size": 2, "from_world_size": 2}]
    np.testing.assert_allclose(losses, reference["losses"], rtol=0, atol=1e-6)
    assert samples == reference["samples"]

    from transformers import AutoModelForCausalLM

    from llmray.export.folder import export

    info = export(second.checkpoint, str(tmp_path / "hf"))
    assert info["step"] == STEPS
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").num_parameters() == info["parameters"]

    # `llmray export --out s3://...`: written into the bucket whole, an existing target refused without --overwrite.
    from llmray import storage
    from llmray.cli import main

    out = f"{s3}/exports/s3run"
    assert main(["export", second.checkpoint, "--out", out]) == 0
    assert main(["export", second.checkpoint, "--out", out]) == 2
    got = storage.download(out, str(tmp_path / "from-s3"))
    assert not os.path.exists(os.path.join(got, storage.UPLOADING))
    assert AutoModelForCausalLM.from_pretrained(got).num_parameters() == info["parameters"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch llmray-was-exploited",))


def test_checkpoint_with_pickled_code_is_refused_not_run(small, reference, tmp_path, monkeypatch):
    """A tampered checkpoint (sizes in its markers updated to match) must not execute code on export or resume."""
    import torch

    from llmray.export.folder import export
    from llmray.train.safe_load import UnsafeCheckpointError

    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil"
    shutil.copytree(reference["summary"].checkpoint, evil)
    target = evil / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": Exploit()}, target)
    marker = evil / "done" / "rank-0.json"
    done = json.loads(marker.read_text())
    done["files"]["state/mp_rank_00_model_states.pt"] = target.stat().st_size
    marker.write_text(json.dumps(done))
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        export(str(evil), str(tmp_path / "out"))
    assert not (tmp_path / "llmray-was-exploited").exists() and not (tmp_path / "out").exists()


class RefuseACheckpointMidUpload:
    """FaultyStorage's cue: the uploads into the run's `nth` checkpoint folder (0-based, in the order uploads reach
    them) are refused once `let_through` of its requests went in, so that checkpoint is left half-written."""

    def __init__(self, nth: int, let_through: int = 2):
        self.nth, self.let_through = nth, let_through
        self.folders: list[str] = []
        self.passed = Counter()

    def __call__(self, method: str, path: str) -> bool:
        folder = next((part for part in path.split("/") if re.fullmatch(r"checkpoint_\d{4}-\d\d-\d\d_[\d.-]+", part)), None)
        if method not in ("PUT", "POST") or folder is None:
            return False
        if folder not in self.folders:
            self.folders.append(folder)
        if self.folders.index(folder) != self.nth or self.passed[folder] < self.let_through:
            self.passed[folder] += 1
            return False
        return True


@pytest.fixture
def faulty_s3(monkeypatch):
    """moto's S3 behind a FaultyStorage proxy, which the run's AWS environment points at."""
    from helpers import FaultyStorage, moto_s3

    with moto_s3("llmray") as env:
        proxy = FaultyStorage(env["AWS_ENDPOINT_URL"])
        for key, value in {**env, "AWS_ENDPOINT_URL": proxy.url}.items():
            monkeypatch.setenv(key, value)
        try:
            yield proxy
        finally:
            proxy.close()


def test_a_checkpoint_upload_failing_midway_is_retried_from_the_previous_one(small, reference, faulty_s3):
    """The step-12 checkpoint's upload refused halfway (scaling.max_failures=1): the run restarts from step 6's and
    trains what the uninterrupted run did; the half-written folder stays behind, never resumed from."""
    cue = faulty_s3.fail = RefuseACheckpointMidUpload(nth=1)
    summary = fit(recipe(small, "s3://llmray/runs", "upload-retried", "scaling.max_failures=1"))
    assert faulty_s3.refused > 0 and len(cue.folders) >= 3
    state, losses, samples = trace(summary)
    assert resumes(state) == [{"step": 6, "world_size": 2, "from_world_size": 2}]
    np.testing.assert_allclose(losses, reference["losses"], rtol=0, atol=1e-6)
    assert samples == reference["samples"]
    half_written = f"s3://llmray/runs/upload-retried/{cue.folders[1]}"
    with pytest.raises(CheckpointError, match="incomplete|truncated|does not exist"):
        verify(half_written)
    assert half_written not in [uri for _, uri in list_checkpoints("s3://llmray/runs/upload-retried")]


def test_a_checkpoint_upload_failing_midway_stops_the_run_saying_so(small, faulty_s3, capsys):
    """The same fault with no failures allowed: the run stops with one line naming the step and the storage; the
    step-6 checkpoint is intact and is where a rerun would continue."""
    faulty_s3.fail = RefuseACheckpointMidUpload(nth=1)
    with pytest.raises(CheckpointUploadError, match=r"the checkpoint of step 12 could not be written to s3://llmray/runs"):
        fit(recipe(small, "s3://llmray/runs", "upload-stopped", "train.max_steps=12"))
    assert [step for step, _ in list_checkpoints("s3://llmray/runs/upload-stopped")] == [6]
