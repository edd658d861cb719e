"""Serving throughput and latency: a load generator on 127.0.0.1 against `llmray serve`'s app at concurrency
1, 4 and 16 (`--levels`), and the same generations done one by one in this process with `transformers` as the
baseline. On a GPU both run there in bf16 and the figures go to serve_gpu.json, e.g. for a ~1B model:

    python benchmarks/serve.py --hidden 2048 --layers 16 --levels 1 16 64 --max-batch-size 64 --tokens 128

Each request streams a completion of exactly --tokens tokens (ignore_eos) from a short prompt. Per level:
requests/s, generated tokens/s, p50/p99 latency, p50/p99 time to first token. The HTTP path's overhead is the
p50 latency at concurrency 1 minus the p50 of the same request through the engine in-process (no HTTP, no Serve).
On a GPU the engine also runs in process with CUDA graphs and without, at the lowest and highest level: what the
graphs buy.

    python benchmarks/serve.py [--hidden 256 --layers 4] [--tokens 32] [--requests 48] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from common import CACHE, emit, serve_locally, stdlib_corpus

PROMPTS = [f"def handler_{i}(request, *args):\n    " for i in range(64)]


def build_model(tok_dir: str, hidden: int, layers: int) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = CACHE / f"serve-model-h{hidden}-l{layers}"
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 64), intermediate_size=hidden * 3,
                             max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def baseline(model_dir: str, tokens: int, count: int) -> dict:
    """One request after another, in this process: `generate` with its KV cache, greedy, exactly `tokens`."""
    import torch
    from transformers import AutoTokenizer

    from llmray.model.build import inference_device, load_for_inference

    tok = AutoTokenizer.from_pretrained(model_dir)
    device = inference_device()
    model = load_for_inference(model_dir, device)  # as the engine loads it: bf16 on a GPU
    latencies = []
    with torch.no_grad():
        for i in range(count):
            ids = tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids.to(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id)
            if device.type == "cuda":
                torch.cuda.synchronize()
            latencies.append(time.perf_counter() - t0)
    return {"requests": count, "tokens_per_s": round(count * tokens / sum(latencies), 1),
            "p50_latency_ms": round(pct(latencies, 0.5) * 1e3, 1)}


def engine_in_process(model_dir: str, tokens: int, count: int, max_batch_size: int, concurrency: int = 1,
                      cuda_graphs: bool | None = None) -> dict:
    """`count` requests through llmray's engine, `concurrency` at a time, with no HTTP and no Serve in between
    (after one warm-up round, which also captures the graphs its shapes need): tokens/s, p50 and p99 latency."""
    from llmray.serve.engine import Engine
    from llmray.serve.sampling import Sampling

    engine = Engine(model_dir, max_batch_size=max_batch_size, batch_wait_s=0.005, device=None,  # as served below
                    cuda_graphs=cuda_graphs)

    async def one(prompt: str) -> float:
        t0 = time.perf_counter()
        async for _ in engine.stream(engine.encode(prompt), Sampling(tokens, 0.0, ignore_eos=True)):
            pass
        return time.perf_counter() - t0

    async def client(k: int, latencies: list[float]) -> None:
        for i in range(k, count, concurrency):
            latencies.append(await one(PROMPTS[i % len(PROMPTS)]))

    async def run() -> tuple[list[float], float]:
        latencies: list[float] = []
        t0 = time.perf_counter()
        await asyncio.gather(*[client(k, latencies) for k in range(concurrency)])
        return latencies, time.perf_counter() - t0

    asyncio.run(run())
    latencies, wall = asyncio.run(run())
    return {"concurrency": concurrency, "tokens_per_s": round(count * tokens / wall, 1),
            "p50_latency_ms": round(pct(latencies, 0.5) * 1e3, 1), "p99_latency_ms": round(pct(latencies, 0.99) * 1e3, 1),
            "engine": dict(engine.stats)}


def graphs_on_and_off(model_dir: str, tokens: int, levels: list[int], max_batch_size: int) -> list[dict]:
    """The engine in process with CUDA graphs and without, at the lowest and highest concurrency."""
    out = []
    for c in (levels[0], levels[-1]):
        on, off = (engine_in_process(model_dir, tokens, 2 * c, max_batch_size, c, graphs) for graphs in (True, False))
        out.append({"concurrency": c, "tokens_per_s_graphs": on["tokens_per_s"], "tokens_per_s_eager": off["tokens_per_s"],
                    "p50_latency_ms_graphs": on["p50_latency_ms"], "p50_latency_ms_eager": off["p50_latency_ms"],
                    "ratio_graphs_vs_eager": round(on["tokens_per_s"] / off["tokens_per_s"], 2),
                    "graphs_captured": on["engine"]["decode_graphs"]})
    return out


async def load(url: str, concurrency: int, tokens: int, count: int, seconds: float, stream: bool = True) -> dict:
    """`concurrency` clients issuing completions until `count` are done or `seconds` pass (time to first token
    is measured on streamed ones)."""
    import httpx

    latencies, ttfts, errors = [], [], 0
    issued = 0
    stop_at = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued, errors
        while issued < count and time.perf_counter() < stop_at:
            prompt = PROMPTS[issued % len(PROMPTS)]
            issued += 1
            t0 = time.perf_counter()
            first = None
            body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": stream,
                    "ignore_eos": True}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    errors += 1
                    continue
                async for line in r.aiter_lines():
                    if first is None and (line.startswith("data: {") or not stream):
                        first = time.perf_counter() - t0
            latencies.append(time.perf_counter() - t0)
            ttfts.append(first or latencies[-1])

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "stream": stream, "requests": len(latencies), "errors": errors,
            "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(len(latencies) * tokens / wall, 1),
            "p50_latency_ms": round(pct(latencies, 0.5) * 1e3, 1), "p99_latency_ms": round(pct(latencies, 0.99) * 1e3, 1),
            "p50_ttft_ms": round(pct(ttfts, 0.5) * 1e3, 1), "p99_ttft_ms": round(pct(ttfts, 0.99) * 1e3, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=48, help="per concurrency level")
    p.add_argument("--seconds", type=float, default=60, help="per concurrency level")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    p.add_argument("--max-batch-size", type=int, default=16, help="the engine's rows per forward")
    args = p.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    _, tok = stdlib_corpus()
    model_dir = build_model(tok, args.hidden, args.layers)
    base = first = baseline(model_dir, args.tokens, min(args.requests, 24))
    in_process_p50 = engine_in_process(model_dir, args.tokens, 16, args.max_batch_size)["p50_latency_ms"] / 1e3
    graphs = graphs_on_and_off(model_dir, args.tokens, args.levels, args.max_batch_size) if gpu else None

    url = serve_locally(model_dir, gpu, max_batch_size=args.max_batch_size, batch_wait_ms=5)
    asyncio.run(load(url, 1, args.tokens, 4, 30))  # warm-up
    levels = [asyncio.run(load(url, c, args.tokens, args.requests, args.seconds)) for c in args.levels]
    whole = [asyncio.run(load(url, c, args.tokens, args.requests, args.seconds, stream=False))
             for c in (args.levels[0], args.levels[-1])]
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    after = baseline(model_dir, args.tokens, min(args.requests, 24))
    # The baseline runs before and after the load (this VM's speed drifts); the faster one is the ratio's base.
    base = max(base, after, key=lambda b: b["tokens_per_s"])
    for level in levels + whole:
        level["ratio_tokens_per_s_vs_baseline"] = round(level["tokens_per_s"] / base["tokens_per_s"], 2)
    figures = {
        "model": {"hidden": args.hidden, "layers": args.layers, "path": model_dir},
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu x{os.cpu_count() or 2}", "tokens_per_request": args.tokens,
        "max_batch_size": args.max_batch_size,
        "baseline_one_by_one_in_process": base, "baseline_runs_tokens_per_s": [first["tokens_per_s"], after["tokens_per_s"]],
        "served": levels, "served_not_streamed": whole,
        "engine_in_process_p50_latency_ms": round(in_process_p50 * 1e3, 1),
        "engine_cuda_graphs_vs_eager": graphs,
        "http_path_p50_overhead_ms": round(levels[0]["p50_latency_ms"] - in_process_p50 * 1e3, 1),
        "http_path_p50_overhead_ms_not_streamed": round(whole[0]["p50_latency_ms"] - in_process_p50 * 1e3, 1),
    }
    emit("serve_gpu" if gpu else "serve", figures)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
