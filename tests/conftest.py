"""Shared fixtures: a real local Ray cluster (one per session), a small corpus of the interpreter's own
sources, and a BPE tokenizer trained on it. Nothing is downloaded."""

import os
import sysconfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on for new local clusters
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]


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
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket="llmray")
    yield "s3://llmray/runs"
    server.stop()
