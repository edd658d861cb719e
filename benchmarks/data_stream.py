"""The token stream's throughput, and what its path to the workers could carry.

1. Tokens/s a Train worker receives over one epoch, start-up included (Ray Data tokenize+pack, the coordinator,
   the rank's fetches), against the same tokenizer's `encode_batch` over the same texts in one process with the
   same CPUs (texts already in memory: the stream also reads Parquet), and the marginal rate over more epochs.
   Start-up (Ray Data's executor and actor pool, and the first block: a block must be whole before its rows can
   be shuffled) is a fixed cost, so the ratio is also taken over one epoch of a corpus `--large-copies` times
   larger (each source file repeated).
2. The stream feeding 8 and 64 simulated ranks (consumers that only take batches): the samples/s delivered on
   this machine, and the samples/s the coordinator could route (rows / seconds it spends routing, the wait for
   tokenization left out), against what 64 H100s training a 1B model consume (~200k tokens/s each).

    python benchmarks/data_stream.py [--cpus 2] [--large-copies 4]
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

from common import emit, stdlib_corpus

SEQ = 512
H100_TOKENS_PER_S_1B = 200_000  # one H100 training a 1B model, roughly


def baseline(shards: list[str], tokenizer: str, cpus: int) -> tuple[int, float]:
    import os

    import pyarrow.parquet as pq

    os.environ["RAYON_NUM_THREADS"] = str(cpus)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from llmray.data.tokenizer import load_tokenizer

    backend = load_tokenizer(tokenizer).backend_tokenizer
    texts = [t for s in shards for t in pq.read_table(s, columns=["text"]).column(0).to_pylist()]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 512):
        tokens += sum(len(e.ids) + 1 for e in backend.encode_batch(texts[i:i + 512], add_special_tokens=False))
    return tokens, time.perf_counter() - start


def spec_of(shard_dir: str, tokenizer: str, cpus: int, tasks: int, epochs: int | None):
    from llmray.data.pack import StreamSpec
    from llmray.data.split import Documents

    return StreamSpec.of([("stdlib", 1.0, Documents(shard_dir))], tokenizer, SEQ, 0, batch_docs=512,
                         max_epochs=epochs, tasks=tasks, cpus_per_task=cpus / tasks)


def one_rank(spec) -> tuple[int, float]:
    """Tokens one rank receives over the spec's epochs, and the seconds from start to its last batch."""
    from llmray.data.stream import RankStream, StreamCoordinator

    start = time.perf_counter()
    coord = StreamCoordinator.remote(spec)
    tokens = sum(b["input_ids"].size for b in RankStream(coord, uuid.uuid4().hex, 0, 1, 64, prefetch=8))
    return tokens, time.perf_counter() - start


def many_ranks(spec, world: int, steps: int, rows: int = 4) -> dict:
    """`world` ranks (threads in a few consumer actors) take `steps` micro-batches each."""
    import ray

    from llmray.data.stream import RankStream, StreamCoordinator

    @ray.remote(num_cpus=0)
    class Consumers:
        def run(self, coord, session, ranks, world, steps, rows):
            def take(rank):
                stream = RankStream(coord, session, rank, world, rows, prefetch=8)
                for _ in range(steps):
                    next(stream)

            threads = [threading.Thread(target=take, args=(r,)) for r in ranks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    coord = StreamCoordinator.remote(spec)
    session, groups = uuid.uuid4().hex, min(8, world)
    start = time.perf_counter()
    ray.get([Consumers.remote().run.remote(coord, session, list(range(g, world, groups)), world, steps, rows)
             for g in range(groups)])
    wall = time.perf_counter() - start
    stats = ray.get(coord.stats.remote())
    samples = world * steps * rows
    need = 64 * H100_TOKENS_PER_S_1B / SEQ
    return {"ranks": world, "samples": samples, "wall_s": round(wall, 2),
            "delivered_samples_per_s": round(samples / wall), "coordinator_route_s": round(stats["route_s"], 3),
            "routable_samples_per_s": round(stats["rows"] / max(stats["route_s"], 1e-9)),
            "needed_by_64_h100_1b_samples_per_s": round(need),
            "routable_over_needed": round(stats["rows"] / max(stats["route_s"], 1e-9) / need, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--large-copies", type=int, default=4)
    args = p.parse_args()
    import ray

    from llmray.data.corpus import list_shards

    shard_dir, tok = stdlib_corpus()
    shards = [s.path for s in list_shards(shard_dir)]
    base_tokens, base_s = baseline(shards, tok, args.cpus)
    base_tps = base_tokens / base_s
    large_dir, _ = stdlib_corpus(copies=args.large_copies)
    large_base_tokens, large_base_s = baseline([s.path for s in list_shards(large_dir)], tok, args.cpus)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    one_tokens, one_s = one_rank(spec_of(shard_dir, tok, args.cpus, args.tasks, 1))
    many_tokens, many_s = one_rank(spec_of(shard_dir, tok, args.cpus, args.tasks, args.epochs))
    marginal = (many_tokens - one_tokens) / (many_s - one_s)
    large_tokens, large_s = one_rank(spec_of(large_dir, tok, args.cpus, args.tasks, 1))
    large_ratio = (large_tokens / large_s) / (large_base_tokens / large_base_s)
    ranks = [many_ranks(spec_of(shard_dir, tok, args.cpus, args.tasks, None), world, steps=40 if world == 8 else 6)
             for world in (8, 64)]
    ray.shutdown()
    emit("data_stream", {
        "corpus_shards": len(shards), "cpus": args.cpus, "tokenize_tasks": args.tasks, "seq_len": SEQ,
        "baseline_encode_batch_tokens_per_s": round(base_tps), "baseline_tokens": base_tokens,
        "ray_stream_one_epoch_tokens_per_s": round(one_tokens / one_s), "ray_stream_one_epoch_s": round(one_s, 2),
        "ray_stream_marginal_tokens_per_s": round(marginal), "epochs_for_marginal": args.epochs,
        "ratio_one_epoch_incl_startup": round(one_tokens / one_s / base_tps, 3),
        "ratio_marginal": round(marginal / base_tps, 3),
        "large_corpus": {"copies": args.large_copies, "tokens": large_tokens, "one_epoch_s": round(large_s, 2),
                         "baseline_encode_batch_tokens_per_s": round(large_base_tokens / large_base_s),
                         "ratio_one_epoch_incl_startup": round(large_ratio, 3)},
        "simulated_ranks": ranks,
    })


if __name__ == "__main__":
    main()
