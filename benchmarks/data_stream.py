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


def ray_stream(shard_dir: str, shards: list[str], tokenizer: str, cpus: int, actors: int, epochs: int) -> tuple[int, float]:
    """Tokens a Train worker receives over `epochs` epochs, and the seconds from start to the last batch."""
    from llmray.data.pack import StreamSpec
    from llmray.data.split import Documents
    from llmray.data.stream import RankStream, StreamCoordinator

    spec = StreamSpec(Documents(shard_dir), tuple(shards), tokenizer=tokenizer, seq_len=512, seed=0, batch_docs=512,
                      max_epochs=epochs, actors=actors, cpus_per_actor=cpus / actors)
    start = time.perf_counter()
    coord = StreamCoordinator.remote(spec)
    tokens = sum(b["input_ids"].size for b in RankStream(coord, "bench", 0, 1, 64, prefetch=8))
    return tokens, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    from llmray.data.corpus import list_shards

    shard_dir, tok = stdlib_corpus()
    shards = [s.path for s in list_shards(shard_dir)]
    import ray

    base_tokens, base_s = baseline(shards, tok)
    base_tps = base_tokens / base_s
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    one_tokens, one_s = ray_stream(shard_dir, shards, tok, args.cpus, args.actors, epochs=1)
    many_tokens, many_s = ray_stream(shard_dir, shards, tok, args.cpus, args.actors, epochs=args.epochs)
    ray.shutdown()
    # The marginal rate (extra tokens / extra seconds) leaves out the one-off start of Ray Data and the actors,
    # but keeps what every further epoch costs (a new Dataset, its actor pool, the first shard's latency).
    marginal = (many_tokens - one_tokens) / (many_s - one_s)
    emit("data_stream", {
        "corpus_shards": len(shards), "cpus": args.cpus, "tokenize_actors": args.actors,
        "baseline_encode_batch_tokens_per_s": round(base_tps), "baseline_tokens": base_tokens,
        "ray_stream_one_epoch_tokens_per_s": round(one_tokens / one_s), "ray_stream_one_epoch_s": round(one_s, 2),
        "ray_stream_marginal_tokens_per_s": round(marginal), "epochs_for_marginal": args.epochs,
        "ratio_one_epoch_incl_startup": round(one_tokens / one_s / base_tps, 3),
        "ratio_marginal": round(marginal / base_tps, 3),
    })


if __name__ == "__main__":
    main()
