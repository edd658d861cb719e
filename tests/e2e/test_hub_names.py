"""A user's first fine-tune, by Hub names: a recipe naming `org/tiny` and `hf://datasets/org/arith` (a train split,
gsm8k-like field names) trains on 2 Ray Train workers with HF_HUB_OFFLINE=1 from a Hub cache populated by hand (no
server at all), is exported, then pushed with `--push-to-hub` to a Hub on 127.0.0.1 (tests/hub_server.py) and served
by its new name from there. Every process (workers, the stream's tasks, replicas) gets the driver's Hub settings."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import arithmetic_chats, free_port, greedy_reference
from hub_server import FakeHub, populate_cache

from llmray import hub
from llmray.export.folder import export
from llmray.export.publish import push
from llmray.model import lineage
from llmray.recipe.load import load_recipe
from llmray.train.trainer import fit

pytestmark = pytest.mark.ray


@pytest.fixture
def hub_cache(model_dir, tmp_path, monkeypatch):
    """org/tiny and org/arith (Parquet per split, gsm8k's field names) in a Hub cache; this process offline on it."""
    cache = tmp_path / "hf" / "hub"
    data = tmp_path / "arith"
    (data / "data").mkdir(parents=True)
    for split, chats in (("train", arithmetic_chats(160)), ("test", arithmetic_chats(20, seed=1))):
        rows = [{"question": c[0]["content"], "answer": c[1]["content"]} for c in chats]
        pq.write_table(pa.Table.from_pylist(rows), data / "data" / f"{split}-00000-of-00001.parquet")
    commits = {"org/tiny": populate_cache(cache, "models", "org/tiny", model_dir),
               "org/arith": populate_cache(cache, "datasets", "org/arith", data)}
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens: offline means it
    return commits


@pytest.fixture
def fake_hub(monkeypatch):
    server = FakeHub.start()
    yield server
    server.stop()


def test_a_recipe_of_hub_names_trains_offline_on_two_workers_exports_pushes_and_serves(hub_cache, fake_hub, ray_cluster,
                                                                                        tmp_path, monkeypatch):
    from ray import serve

    recipe = load_recipe("jobs/sft_tiny.yaml", [
        "model.pretrained=org/tiny", "data.conversations=hf://datasets/org/arith/data", "data.split=train",
        "data.columns={instruction: question, output: answer}", f"run.storage_path={tmp_path / 'runs'}",
        "run.name=hub", "data.seq_len=64", "train.max_steps=4", "train.log_every=2", "train.eval_every=0",
        "train.checkpoint_every=4", "train.warmup_steps=1", "scaling.num_workers=2"])
    summary = fit(recipe)
    assert summary.steps == 4 and summary.conversations["documents"] == 160  # the train split alone
    state = json.loads((tmp_path / "runs" / "hub" / "summary.json").read_text())
    assert state["steps"] == 4

    out = tmp_path / "export"
    info = export(summary.checkpoint, str(out))
    assert info["recipe"]["model"]["pretrained"] == f"org/tiny@{hub_cache['org/tiny']}"  # the commit it trained on
    assert lineage.read(out)["recipe"]["data"]["conversations"] == f"hf://datasets/org/arith@{hub_cache['org/arith']}/data"

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)  # online now, to publish and serve from the Hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    push(str(out), "me/tiny-arith")
    card = fake_hub.files("models", "me/tiny-arith")["README.md"].decode()
    assert "base_model: org/tiny" in card and "- org/arith" in card and "| training loss |" in card

    from llmray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"path": "me/tiny-arith"}]},
                        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": hub.env()}}),
              name="from-hub", route_prefix="/hub")
    try:
        import httpx

        base = f"http://127.0.0.1:{port}/hub/v1"
        assert [m["id"] for m in httpx.get(f"{base}/models").json()["data"]] == ["me/tiny-arith"]
        r = httpx.post(f"{base}/completions", json={"model": "me/tiny-arith", "prompt": "What is 2 + 3?",
                                                    "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy_reference(out)("What is 2 + 3?", 8)
    finally:
        serve.shutdown()
