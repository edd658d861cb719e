"""Shared set-up for the benchmarks: a corpus every Python install carries, sharded and tokenized once; results
written; a training run's steady-state figures."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CACHE = Path(os.environ.get("LLMRAY_BENCH_DIR", "/tmp/llmray-bench"))


def stdlib_corpus(vocab_size: int = 4000, copies: int = 1) -> tuple[str, str]:
    """(shard folder, tokenizer folder) built from the interpreter's standard library sources, cached. `copies`:
    each source file that many times, for a corpus large enough to amortise a pipeline's start-up."""
    from llmray.data.shard import shard_corpus
    from llmray.data.tokenizer import train_tokenizer

    shards, tok = CACHE / ("shards" if copies == 1 else f"shards_x{copies}"), CACHE / "tok"
    if not (shards / "_manifest.json").exists():
        shard_corpus([sysconfig.get_paths()["stdlib"]] * copies, str(shards), shard_size="4MB", include=("*.py",),
                     overwrite=True, exclude=("*/site-packages/*", "*/test/*"))
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(str(shards), vocab_size, str(tok), max_docs=3000)
    return str(shards), str(tok)


def base_model(tokenizer_dir: str, out: str, seq_len: int, **shape) -> None:
    """A random-init Llama of `shape` (hidden_size, num_hidden_layers, ...) with the tokenizer, saved to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=seq_len, **shape)).save_pretrained(out)
    tok.save_pretrained(out)


def emit(name: str, figures: dict) -> None:
    """Print the figures as JSON and keep them beside the script's other results."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


def steady(history: list[dict]) -> dict:
    """A training run's report history as steady-state figures: tokens/s, MFU, step time and data-wait share
    averaged over the report windows after the first (compilation, warm-up), the run's memory peaks and its last
    reported loss."""
    windows = history[1:] or history
    out = {}
    for key in ("tokens_per_s", "mfu", "step_time_s", "data_wait_share"):
        values = [h[key] for h in windows if h.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    for key in ("peak_memory_gb", "peak_host_memory_gb"):
        values = [h[key] for h in history if h.get(key) is not None]
        if values:
            out[key] = max(values)
    if history and history[-1].get("loss") is not None:
        out["final_loss"] = history[-1]["loss"]  # runs that should train alike are compared on it
    return out


def serve_locally(model_dir: str, gpu: bool, **args) -> str:
    """A local Ray with every CPU, and the OpenAI app serving `model_dir` as "bench" (`args`: ServeArgs beyond
    the model) on a free port of 127.0.0.1, the replica taking every CPU (and the GPU); returns its URL."""
    import socket

    import ray
    from ray import serve

    from llmray.serve.app import build_app

    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"path": model_dir, "name": "bench"}], **args},
                        ray_actor_options={"num_cpus": cpus, "num_gpus": int(gpu)}), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"
