"""Models and datasets by their Hub names, without a network: a Hub on 127.0.0.1 (tests/hub_server.py, the HTTP API
huggingface_hub itself calls) and a Hub cache populated by hand, read with HF_HUB_OFFLINE=1."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, free_port
from hub_server import FakeHub, populate_cache

from llmray import hub, storage


@pytest.fixture(scope="module")
def fake_hub():
    server = FakeHub.start()
    yield server
    server.stop()


@pytest.fixture
def online(fake_hub, tmp_path, monkeypatch):
    """This process (and what it starts) reaches the test Hub, with an empty cache of its own."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "llmray-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake_hub


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No Hub at all (the endpoint is a closed port), HF_HUB_OFFLINE=1, and a cache to populate."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return Path(tmp_path / "hf" / "hub")


def qa_dataset(root: Path) -> Path:
    """A Hub-style dataset: Parquet files per split, gsm8k's field names (question, answer)."""
    for split, n in (("train", 40), ("test", 10)):
        rows = [{"question": f"What is {i} + {i}?", "answer": f"{2 * i}"} for i in range(n)]
        (root / "main").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "main" / f"{split}-00000-of-00001.parquet")
    return root


def test_a_hub_name_is_told_from_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub.is_hub_id("Qwen/Qwen2.5-0.5B") and hub.is_hub_id("org/name@v1.0")
    assert hub.split_id("org/name@abc") == ("org/name", "abc")
    assert not hub.is_hub_id("org/local")  # a folder that exists here is a folder
    assert not any(hub.is_hub_id(p) for p in ("./org/x", "/abs/x", "~/x", "s3://b/x", "one", "a/b/c"))
    assert hub.display_name("org/name@abc") == "org/name" and hub.display_name("/exports/tiny/") == "tiny"
    assert hub.parse_dataset_uri("hf://datasets/org/ds@r/main/train.parquet") == ("org/ds", "r", "main/train.parquet")
    with pytest.raises(hub.HubError, match="hf://datasets/org/name"):
        hub.parse_dataset_uri("hf://org/ds")


def card_folder(tmp_path: Path) -> Path:
    """A commit's worth of change: a README.md."""
    (tmp_path / "card").mkdir(exist_ok=True)
    (tmp_path / "card" / "README.md").write_text("# a new commit\n")
    return tmp_path / "card"


def test_a_model_by_hub_name_is_pinned_and_downloaded_once_per_node(online, model_dir, tmp_path):
    sha = online.add("models", "org/tiny", model_dir)
    name = hub.pinned("org/tiny", "model.pretrained")
    assert name == f"org/tiny@{sha}"
    # four processes of one node ask for it at once (as a node's Train workers do): one download
    script = "from llmray import storage; print(storage.local_folder(%r, 'model.pretrained'))" % name
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    folders = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(folders) == 1
    weights = [r for r in online.requests if r.startswith("GET") and r.endswith("/model.safetensors")]
    assert len(weights) == 1, weights
    assert (Path(folders.pop()) / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    # the branch moves on; the pinned name still reads what it was pinned to
    moved = online.add("models", "org/tiny", card_folder(tmp_path))
    assert hub.pinned("org/tiny", "model.pretrained") == f"org/tiny@{moved}"
    assert not (Path(storage.local_folder(name, "model.pretrained")) / "README.md").exists()


def test_an_unknown_name_is_one_line_naming_it(online):
    with pytest.raises(hub.HubError) as e:
        hub.pinned("org/nothing", "model.pretrained")
    assert str(e.value).startswith("model.pretrained: org/nothing is neither a local folder nor a model on "
                                   f"{online.url}") and "\n" not in str(e.value)


def test_offline_a_populated_cache_loads_and_a_missing_name_stops_before_ray(offline, model_dir, corpus, tmp_path,
                                                                              capsys):
    from llmray.data.tokenizer import load_tokenizer
    from llmray.model.build import build_model
    from llmray.recipe.schema import ModelSettings

    sha = populate_cache(offline, "models", "org/tiny", model_dir)
    assert hub.pinned("org/tiny", "model.pretrained") == f"org/tiny@{sha}"
    model = build_model(ModelSettings(pretrained="org/tiny"), 0)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert load_tokenizer("org/tiny").encode("def main():") == load_tokenizer(str(model_dir)).encode("def main():")

    # nothing cached under this name: one line, naming it and HF_HUB_OFFLINE, before any Ray process starts
    import ray

    from llmray.cli import main

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    capsys.readouterr()
    code = main(["finetune", str(REPO / "jobs" / "sft_tiny.yaml"), "model.pretrained=org/missing",
                 f"data.conversations={chats}", f"run.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not ray.is_initialized()
    assert len(err) == 1 and "org/missing" in err[0] and "HF_HUB_OFFLINE" in err[0], err


def test_models_load_without_the_hubs_kernels(model_dir):
    """transformers 5 kernelizes every model it loads (on a GPU: layers swapped for kernels downloaded from the Hub,
    in inference mode) unless told not to; each way llmray loads a model tells it not to."""
    from transformers import AutoModelForCausalLM

    from llmray.model.build import build_model, frozen, load_for_inference
    from llmray.recipe.schema import ModelSettings

    assert AutoModelForCausalLM.from_pretrained(model_dir).use_kernels  # transformers' default
    cpu = torch.device("cpu")
    for model in (build_model(ModelSettings(pretrained=str(model_dir)), 0),
                  frozen(str(model_dir), "model.teacher", cpu, torch.float32), load_for_inference(str(model_dir), cpu)):
        assert model.use_kernels is False


def test_hub_dataset_conversations_hold_out_as_a_local_copy(online, offline_cache_of, model_dir, tmp_path):
    """Conversations from a Hub dataset (its train split, its fields renamed) and from a local copy of the same
    files become the same documents with the same doc ids, so the held-out split is the same; offline, the
    cached snapshot gives them too."""
    from llmray.data.chat import shard_conversations
    from llmray.data.tokenizer import load_tokenizer

    local = qa_dataset(tmp_path / "qa")
    sha = online.add("datasets", "org/qa", local)
    tok = load_tokenizer(str(model_dir))
    columns = {"instruction": "question", "output": "answer"}

    def made(source, out):
        conv = shard_conversations(source, str(tmp_path / out), tok, 64, split="train", columns=columns)
        table = pq.read_table(tmp_path / out, columns=["text", "doc_id"]) if conv.documents else None
        return conv.documents, table.to_pylist()

    uri = hub.pinned_uri("hf://datasets/org/qa/main", "data.conversations")
    assert uri == f"hf://datasets/org/qa@{sha}/main"
    n, from_hub = made(uri, "hub")
    assert n == 40 and made(str(local / "main"), "copy")[1] == from_hub
    assert from_hub[0]["doc_id"] == "train-00000-of-00001.parquet#0"
    assert json.loads(from_hub[3]["text"])[-1] == {"role": "assistant", "content": "6"}
    offline_cache_of("datasets", "org/qa", local)
    assert made(uri.replace(sha, offline_cache_of.sha), "cached")[1] == from_hub


@pytest.fixture
def offline_cache_of(tmp_path, monkeypatch):
    """Populates a cache with a repository and switches this process offline onto it (`.sha`: its commit)."""
    def populate(kind, repo_id, folder):
        cache = tmp_path / "offline-hf" / "hub"
        populate.sha = populate_cache(cache, kind, repo_id, folder)
        monkeypatch.setenv("HF_HOME", str(cache.parent))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    return populate


def test_a_resumed_run_keeps_the_commits_it_started_on(online, model_dir, tmp_path):
    from llmray.recipe.load import with_pinned_names

    first = online.add("models", "org/tiny", model_dir)
    data = online.add("datasets", "org/qa", qa_dataset(tmp_path / "qa"))
    raw = {"model": {"pretrained": "org/tiny"}, "data": {"conversations": ["hf://datasets/org/qa/main"],
                                                         "sources": [{"name": "qa", "shards": "hf://datasets/org/qa"}]}}
    pinned = with_pinned_names(raw)
    assert pinned["model"]["pretrained"] == f"org/tiny@{first}"
    assert pinned["data"]["conversations"] == [f"hf://datasets/org/qa@{data}/main"]
    assert pinned["data"]["sources"][0]["shards"] == f"hf://datasets/org/qa@{data}"
    moved = online.add("models", "org/tiny", card_folder(tmp_path))
    data_moved = online.add("datasets", "org/qa", card_folder(tmp_path))
    now = with_pinned_names(raw)
    assert now["model"]["pretrained"] == f"org/tiny@{moved}" and data_moved in now["data"]["sources"][0]["shards"]
    assert with_pinned_names(raw, earlier=pinned) == pinned  # continuing: the checkpoint's commits, lists included
    asked = {**raw, "model": {"pretrained": f"org/tiny@{moved}"}}  # a revision the user names is theirs
    assert with_pinned_names(asked, earlier=pinned)["model"]["pretrained"] == f"org/tiny@{moved}"


def test_push_publishes_the_folder_with_a_card_from_its_lineage(online, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmray.export.publish import push
    from llmray.model import lineage

    folder = tmp_path / "export"
    shutil.copytree(model_dir, folder)
    recipe = {"model": {"pretrained": "org/base@" + "a" * 40},
              "data": {"conversations": "hf://datasets/org/qa@" + "b" * 40 + "/main", "split": "train"},
              "finetune": {"method": "lora"}, "train": {"max_steps": 12}}
    lineage.write(folder, {"checkpoint": "/runs/sft/checkpoint_000012", "step": 12, "tokens": 6144, "dtype": "float32",
                           "parameters": 123456, "zero_stage": 2, "world_size": 2, "adapter_only": False,
                           "held_out": {"shards": "/runs/sft/conversations", "val_fraction": 0.1},
                           "figures": {"val_ppl": {"value": 3.25, "step": 12}, "eval/qa/exact_match":
                                       {"value": 0.75, "step": 12}},
                           "recipe": recipe})
    url = push(str(folder), "me/tiny-sft")
    assert url.startswith(online.url)
    files = online.files("models", "me/tiny-sft")
    assert {p.name for p in folder.iterdir()} | {"README.md"} <= set(files)
    card = files["README.md"].decode()
    meta = card.split("---")[1]
    assert "base_model: org/base" in meta and "- org/qa" in meta and "- lora" in meta
    assert "| validation perplexity | 3.25 | 12 |" in card and "| qa exact_match | 0.75 | 12 |" in card
    assert "max_steps: 12" in card and "LoRA fine-tuning" in card
    # what was published loads by its name
    loaded = AutoModelForCausalLM.from_pretrained(storage.local_folder("me/tiny-sft", "model"))
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


def test_a_run_on_shared_storage_publishes_the_model_there_once(online, model_dir, s3, tmp_path, monkeypatch):
    sha = online.add("models", "org/tiny", model_dir)
    name = f"org/tiny@{sha}"
    mirrors = storage.mirror_hub_models([name], "s3://llmray/runs")
    assert mirrors == {name: f"s3://llmray/runs/hub/models--org--tiny/{sha}"}
    asked = len(online.requests)
    assert storage.mirror_hub_models([name], "s3://llmray/runs") == mirrors  # already there: not again
    monkeypatch.setenv(storage.MIRRORS_ENV, json.dumps(mirrors))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "worker-hf"))  # a worker on another node: an empty cache
    folder = storage.local_folder(name, "model.pretrained")
    assert (Path(folder) / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert len(online.requests) == asked  # the worker read the run's storage, not the Hub


def test_hub_dataset_shards_stream_and_hold_out_as_a_local_copy(online, corpus, tmp_path):
    """Parquet files of a Hub dataset (a text column, no doc_id) as data.shards: the same held-out documents and
    the same packed rows as the same files read locally."""
    import numpy as np

    from llmray.data.pack import StreamSpec, first_rows
    from llmray.data.split import Documents

    local = tmp_path / "web" / "en"
    local.mkdir(parents=True)
    for k in range(2):
        texts = [f"def f{k}_{i}(x):\n    return x * {i}\n" * 3 for i in range(60)]
        pq.write_table(pa.table({"text": texts}), local / f"train-0000{k}-of-00002.parquet")
    sha = online.add("datasets", "org/web", local.parent)

    def rows(location, part):
        spec = StreamSpec.of([("web", 1.0, Documents(location, part, 0.2))], corpus["tokenizer"], 32, 7, batch_docs=64)
        return first_rows(spec, 64)["input_ids"]

    for part in ("train", "val"):
        from_hub = rows(f"hf://datasets/org/web@{sha}/en", part)
        assert len(from_hub) > 4 and np.array_equal(from_hub, rows(str(local), part))
