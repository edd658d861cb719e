"""Shared fixtures: a real local Ray cluster (one per session), a small corpus of the interpreter's own
sources and a BPE tokenizer trained on it, a tiny random Llama saved as `llmray export` would, and a moto S3
server. Nothing is downloaded. Helpers that are not fixtures are in helpers.py.

The suite is split by cost: tests/unit starts no Ray (seconds), tests/e2e starts real Ray (Train, DeepSpeed, Serve,
Tune) and every test there is marked `ray`. Collection refuses a test that would start the shared cluster without
the marker, and tests/unit/conftest.py fails a unit test that starts Ray itself."""

import os
import sysconfig
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on for new local clusters
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # the tests' Hub (tests/hub_server.py) serves plain HTTP, no Xet
# Ray Train's controller polls its workers every 2 s by default, and a worker's checkpoint or validation report waits for
# that poll (llmray/train/worker.py); the tests' runs report every few steps, so they poll 4x as often. Same runs,
# same reports, less waiting: ~6 s of ~30 s per run on 2 cores. Set before ray.init, so the raylet passes it on.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# quantize and prune reports time greedy decoding on a short answer (benchmarks/ measure speed)
os.environ.setdefault("LLMRAY_QUICK_SPEED", "1")

import pytest  # noqa: E402
from helpers import moto_s3  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
TESTS = Path(__file__).resolve().parent
RAY_FIXTURES = {"ray_cluster"}
CONTEXT = 256  # model_dir's positions


def pytest_collection_modifyitems(config, items):
    """Whether a test may start Ray is its marker's to say, and its folder's: `ray` tests live in tests/e2e,
    unmarked ones in tests/unit."""
    wrong = []
    for item in items:
        marked = item.get_closest_marker("ray") is not None
        path = Path(item.path).resolve()
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and not marked:
            wrong.append(f"{item.nodeid}: uses the ray_cluster fixture but is not marked `ray`")
        elif TESTS / "e2e" in path.parents and not marked:
            wrong.append(f"{item.nodeid}: is in tests/e2e but not marked `ray` (pytestmark = pytest.mark.ray)")
        elif TESTS / "unit" in path.parents and marked:
            wrong.append(f"{item.nodeid}: is marked `ray` but in tests/unit, which starts no Ray; move it to tests/e2e")
    if wrong:
        raise pytest.UsageError("tests that start Ray must be marked `ray` and live in tests/e2e:\n  "
                                + "\n  ".join(wrong))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """~0.6 MB of Python source in 3+ shards, and a 1000-token BPE trained on them."""
    from llmray.data.shard import shard_corpus
    from llmray.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    shards, tok = str(root / "shards"), str(root / "tok")
    shard_corpus([f"{STDLIB}/json", f"{STDLIB}/email", f"{STDLIB}/logging"], shards, shard_size="200KB",
                 include=("*.py",))
    train_tokenizer(shards, 1000, tok)
    return {"shards": shards, "tokenizer": tok, "root": root}


@pytest.fixture(scope="session")
def model_dir(corpus, tmp_path_factory):
    """A random-init tiny Llama with the corpus tokenizer, saved as `llmray export` would (initializer_range
    raised so greedy choices are not near-ties)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("served") / "tiny"
    tok = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=CONTEXT, initializer_range=0.3,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # The dashboard's State API is how Ray Train's PlacementGroupCleaner sees that a stopped trial's controller died
    # and frees its workers' CPUs; without it, the trial after one ASHA stopped waits forever.
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server (moto) on 127.0.0.1 with one bucket, reached through the standard AWS env."""
    with moto_s3("llmray") as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield "s3://llmray/runs"
