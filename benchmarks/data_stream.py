"""Tokens/s of the Ray Data tokenize+pack stream, as a Train worker receives it, against the same tokenizer's
`encode_batch` on the same texts in one process (texts already in memory: the stream also reads Parquet).

    python benchmarks/data_stream.py [--cpus 2]
"""

from __future__ import annotations

import argparse
import time

from common import emit, stdlib_corpus


def baseline(shards: list[str], tokenizer: str) -> tuple[int, float]:
    import pyarrow.parquet as pq

    from llmray.data.tokenizer import load_tokenizer

    backend = load_tokenizer(tokenizer).backend_tokenizer
    texts = [t for s in shards for t in pq.read_table(s, columns=["text"]).column(0).to_pylist()]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 512):
        tokens += sum(len(e.ids) + 1 for e in backend.encode_batch(texts[i:i + 512], add_special_tokens=False))
    return tokens, time.perf_counter() - start


def ray_stream(shards: list[str], tokenizer: str, cpus: int, actors: int) -> dict:
    import ray

    from llmray.data.stream import RankStream, StreamCoordinator, StreamSpec

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    spec = StreamSpec(shards=tuple(shards), tokenizer=tokenizer, seq_len=512, seed=0, split="all", max_epochs=1,
                      actors=actors, cpus_per_actor=cpus / actors)
    start = time.perf_counter()
    stream = RankStream(StreamCoordinator.remote(spec, 1, 64), 0, prefetch=8)
    first = None
    tokens = 0
    for batch in stream:
        if first is None:
            first = time.perf_counter()
        tokens += batch["input_ids"].size
    end = time.perf_counter()
    ray.shutdown()
    return {"tokens": tokens, "seconds_total": end - start, "seconds_after_first_batch": end - first,
            "startup_s": first - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--actors", type=int, default=1)
    args = p.parse_args()
    from llmray.data.corpus import list_shards

    shard_dir, tok = stdlib_corpus()
    shards = [s.path for s in list_shards(shard_dir)]
    base_tokens, base_s = baseline(shards, tok)
    r = ray_stream(shards, tok, args.cpus, args.actors)
    base_tps = base_tokens / base_s
    steady = r["tokens"] / r["seconds_after_first_batch"]
    total = r["tokens"] / r["seconds_total"]
    emit("data_stream", {
        "corpus_shards": len(shards), "cpus": args.cpus, "tokenize_actors": args.actors,
        "baseline_encode_batch_tokens_per_s": round(base_tps), "baseline_tokens": base_tokens,
        "ray_stream_tokens_per_s_steady": round(steady), "ray_stream_tokens_per_s_incl_startup": round(total),
        "ray_stream_tokens": r["tokens"], "ray_startup_s": round(r["startup_s"], 2),
        "ratio_steady": round(steady / base_tps, 3), "ratio_incl_startup": round(total / base_tps, 3),
    })


if __name__ == "__main__":
    main()
