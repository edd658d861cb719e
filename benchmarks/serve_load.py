"""Open-loop load on the served app, as `vllm bench serve` makes it: requests arrive as a Poisson process at each
given rate (`--rates`, requests/s), whether or not the earlier ones have finished, each streaming a completion of
exactly --tokens tokens (ignore_eos) from a short prompt. Per rate:

- TTFT (arrival to the first token), TPOT (the rest of the request's time per token after the first) and ITL (the
  gaps between streamed tokens), p50 and p99;
- goodput: requests/s that met every target (--ttft-target-ms, --tpot-target-ms), as vLLM's `--goodput`;
- failures, by HTTP status (429: past the bounded queue) or an error event in the stream.

Then the rate at which p99 TTFT crosses --ttft-target-ms: the first measured rate above it, and the rate
interpolated between it and the one before. The app streams every token as it comes (stream_interval_ms 0), so ITL is
per token, as vLLM's.

    python benchmarks/serve_load.py [--rates 1 2 4 8 16] [--seconds 20] [--hidden 256 --layers 4] [--tokens 32]

On a GPU the model runs there (bf16) and the figures go to serve_load_gpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

from common import emit, serve_locally, stdlib_corpus

from serve import PROMPTS, build_model, pct


async def one(http, url: str, prompt: str, tokens: int) -> dict:
    """One streamed request: its status, and the times (from its arrival) its tokens came."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0, times, failed = time.perf_counter(), [], None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"failed": str(r.status_code)}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    failed = event["error"].get("code") or "error_event"
                elif event["choices"][0]["text"]:
                    times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a failure to count, whatever it is
        failed = type(e).__name__
    return {"failed": failed, "times": times}


async def at_rate(url: str, rate: float, seconds: float, tokens: int, ttft_target: float, tpot_target: float,
                  seed: int = 0) -> dict:
    import httpx

    rng = random.Random(seed)
    tasks, started = [], time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as http:
        at = 0.0
        while at < seconds:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(http, url, PROMPTS[len(tasks) % len(PROMPTS)], tokens)))
            at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    ok = [r for r in results if not r["failed"] and r["times"]]
    failures: dict[str, int] = {}
    for r in results:
        if r["failed"] or not r["times"]:
            failures[r["failed"] or "no_tokens"] = failures.get(r["failed"] or "no_tokens", 0) + 1
    ttft = [r["times"][0] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in ok if len(r["times"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    good = sum(r["times"][0] <= ttft_target and (len(r["times"]) < 2 or (r["times"][-1] - r["times"][0])
                                                 / (len(r["times"]) - 1) <= tpot_target) for r in ok)

    def ms(values: list[float], q: float) -> float | None:
        return round(pct(values, q) * 1e3, 1) if values else None

    return {"rate": rate, "requests": len(results), "completed": len(ok), "failures": failures,
            "duration_s": round(wall, 1), "requests_per_s": round(len(ok) / wall, 2),
            "output_tokens_per_s": round(sum(len(r["times"]) for r in ok) / wall, 1),
            "goodput_per_s": round(good / wall, 2),
            "p50_ttft_ms": ms(ttft, 0.5), "p99_ttft_ms": ms(ttft, 0.99), "p50_tpot_ms": ms(tpot, 0.5),
            "p99_tpot_ms": ms(tpot, 0.99), "p50_itl_ms": ms(itl, 0.5), "p99_itl_ms": ms(itl, 0.99)}


def crossing(levels: list[dict], target_ms: float) -> dict:
    """Where p99 TTFT first passes the target: the measured rate, and the rate interpolated linearly between it and
    the one before (None: not within the rates measured)."""
    below = None
    for level in levels:
        p99 = level["p99_ttft_ms"]
        if p99 is None or p99 > target_ms:
            if below is None or p99 is None:
                return {"first_rate_over": level["rate"], "interpolated_rate": None}
            frac = (target_ms - below["p99_ttft_ms"]) / (p99 - below["p99_ttft_ms"])
            return {"first_rate_over": level["rate"],
                    "interpolated_rate": round(below["rate"] + frac * (level["rate"] - below["rate"]), 2)}
        below = level
    return {"first_rate_over": None, "interpolated_rate": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16], help="requests/s, ascending")
    p.add_argument("--seconds", type=float, default=20, help="of arrivals per rate")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-waiting-requests", type=int, default=64)
    p.add_argument("--ttft-target-ms", type=float, default=500)
    p.add_argument("--tpot-target-ms", type=float, default=100)
    args = p.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    _, tok = stdlib_corpus()
    model_dir = build_model(tok, args.hidden, args.layers)
    url = serve_locally(model_dir, gpu, max_batch_size=args.max_batch_size,
                        max_waiting_requests=args.max_waiting_requests, batch_wait_ms=5, stream_interval_ms=0)
    ttft_s, tpot_s = args.ttft_target_ms / 1e3, args.tpot_target_ms / 1e3
    asyncio.run(at_rate(url, 2, 2, args.tokens, ttft_s, tpot_s))  # warm-up
    levels = []
    for rate in args.rates:
        levels.append(asyncio.run(at_rate(url, rate, args.seconds, args.tokens, ttft_s, tpot_s)))
        print(json.dumps(levels[-1]), flush=True)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    emit("serve_load_gpu" if gpu else "serve_load", {
        "model": {"hidden": args.hidden, "layers": args.layers},
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu x{os.cpu_count() or 2}", "tokens_per_request": args.tokens,
        "max_batch_size": args.max_batch_size, "max_waiting_requests": args.max_waiting_requests,
        "seconds_per_rate": args.seconds, "ttft_target_ms": args.ttft_target_ms, "tpot_target_ms": args.tpot_target_ms,
        "rates": levels, "p99_ttft_crosses_target": crossing(levels, args.ttft_target_ms)})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
