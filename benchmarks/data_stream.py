"""The token stream's throughput, and what its path to the workers could carry.

1. Tokens/s a Train worker receives over one epoch, start-up included (Ray Data tokenize+pack, the catalog, the
   rank's routing and fetches), against the same tokenizer's `encode_batch` over the same texts in one process with
   the same CPUs (texts already in memory: the stream also reads Parquet), and the marginal rate over more epochs.
   Every epoch is tokenized again (a block is an (epoch, block) work item; nothing is cached across epochs). The
   marginal rate compares two runs taken after a warm-up run: measured cold, the one-epoch run also paid the start of
   the tokenize worker processes (and their tokenizer load) that the later run reused, which inflated it (2.99x).
   Start-up (Ray Data's executor, the first block: a block must be whole before its rows can be shuffled) is a fixed
   cost, so the ratio is also taken over one epoch of a corpus `--large-copies` times larger.
2. The stream feeding 8 to 4,096 simulated ranks (consumers that only take batches, spread over up to 8 processes;
   from 512 ranks they take where their rows are, not the rows, which one machine could not copy 4,096 times): the
   samples/s a rank could route (its rows / the seconds it spends working out where they are, the waits for the
   catalog and for tokenization left out), the total over all ranks, and what the catalog could serve (rows routed /
   the seconds it spent answering, waits for the pipeline left out). Against what training consumes: a rank takes
   MFU x peak FLOP/s / (6 x parameters) tokens/s; 1B parameters on an H100 (989 TFLOP/s dense bf16) at 45% MFU:
   ~74k tokens/s, at 1,024 ranks and 512-token rows ~148k rows/s.

    python benchmarks/data_stream.py [--cpus 2] [--large-copies 4] [--ranks 8,64,512,1024,4096]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from common import emit, stdlib_corpus

SEQ = 512
H100_FLOPS, MFU, PARAMS = 989e12, 0.45, 1e9  # dense bf16 peak, a good MFU, a 1B model
RANK_TOKENS_PER_S = MFU * H100_FLOPS / (6 * PARAMS)  # what one rank consumes: ~74k tokens/s
NEED_RANKS = 1024


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
    from llmray.data.catalog import CatalogActor
    from llmray.data.stream import RankStream

    start = time.perf_counter()
    catalog = CatalogActor.remote(spec)
    tokens = sum(b["input_ids"].size for b in RankStream(catalog, uuid.uuid4().hex, 0, 1, 64, prefetch=8))
    return tokens, time.perf_counter() - start


def many_ranks(spec, world: int, steps: int, rows: int = 4, take_rows: bool = True, step_s: float = 0.0) -> dict:
    """`world` ranks, spread over up to 8 consumer processes, each take `steps` micro-batches of `rows` rows, in
    step (a process serves its ranks in turn); `take_rows` False: each takes where its rows are, not the rows.
    `step_s` > 0: a global micro-batch at most every `step_s` seconds, a training pace the tokenizers keep ahead of
    (the steady state of a run that is not data-bound); 0: as fast as the stream goes (its start-up, and a
    tokenizer-bound frontier on this machine)."""
    import ray

    from llmray.data.catalog import CatalogActor
    from llmray.data.stream import RankStream

    @ray.remote(num_cpus=0)
    class Consumers:
        def run(self, catalog, session, ranks, world, steps, rows, take_rows, step_s, start):
            streams = [RankStream(catalog, session, rank, world, rows, prefetch=4) for rank in ranks]
            for step in range(steps):
                time.sleep(max(0.0, start + step * step_s - time.time()))
                for stream in streams:
                    if take_rows:
                        next(stream)
                    else:
                        if stream.router is None:
                            stream.router = stream_router(stream)
                        stream.route()
            return [(s.rows_routed, s.route_s, s.catalog_calls) for s in streams]

    def stream_router(stream):
        from llmray.data.route import Router

        return Router(ray.get(stream.catalog.layout.remote()), {}, stream.world_size, stream.micro_batch_size,
                      stream.rank)

    catalog = CatalogActor.remote(spec, expected_start={} if step_s else None)  # paced: tokenizing from the start
    session, groups = uuid.uuid4().hex, min(8, world)
    start = time.perf_counter()
    paced_from = time.time() + (2 * step_s if step_s else 0)  # paced: the tokenizers get a lead first
    per_rank = [r for part in ray.get([
        Consumers.remote().run.remote(catalog, session, list(range(g, world, groups)), world, steps, rows, take_rows,
                                      step_s, paced_from)
        for g in range(groups)]) for r in part]
    wall = time.perf_counter() - start
    stats = ray.get(catalog.stats.remote())
    ray.kill(catalog)
    samples = sum(r for r, _, _ in per_rank)
    rank_rates = sorted(r / max(s, 1e-9) for r, s, _ in per_rank)
    per_rank_rate = samples / max(sum(s for _, s, _ in per_rank), 1e-9)
    return {"ranks": world, "rows_per_rank": rows, "steps": steps, "took": "rows" if take_rows else "where rows are",
            "paced_step_s": step_s,
            "samples": samples, "wall_s": round(wall, 2), "delivered_samples_per_s": round(samples / wall),
            "routable_samples_per_s_per_rank": round(per_rank_rate),
            "routable_per_rank_p10_p90": [round(rank_rates[len(rank_rates) // 10]),
                                          round(rank_rates[len(rank_rates) * 9 // 10])],
            "routable_samples_per_s_total": round(per_rank_rate * world),
            "catalog_calls": stats["calls"], "catalog_serve_s": round(stats["serve_s"], 3),
            "catalog_servable_samples_per_s": round(samples / max(stats["serve_s"], 1e-9)),
            "catalog_calls_per_rank_per_step": round(stats["calls"] / world / steps, 3)}


def router_alone(world: int, steps: int = 300, rows: int = 4, block_rows: int = 8192) -> dict:
    """One rank alone in its process (as under Ray Train: no other rank to share a block's drawn row order with),
    routing `steps` micro-batches of a world of `world` ranks over listed blocks of `block_rows` rows (8 runs each),
    no Ray: samples/s it could route per CPU second, per-block work included."""
    from llmray.data.route import Layout, Router, shared_order

    shared_order.cache_clear()
    router = Router(Layout(0, (1.0,), (1,), None, ("",)), {}, world, rows, world // 2)
    source, listed = router.sources[0], [0]

    def listing(g):  # the catalog's replies, made up: block k of 8 runs
        while source.rows() < router.needs(g)[0]:
            source.add(listed[0], 0, [(f"{listed[0]}-{j}", block_rows // 8) for j in range(8)], 1)
            listed[0] += 1

    listing(0)
    router.route(0)
    start = time.process_time()  # CPU seconds: on a shared machine, wall time counts the neighbours' work too
    for g in range(1, steps + 1):
        listing(g)
        router.route(g)
    return {"ranks": world, "router_alone_samples_per_s": round(steps * rows / (time.process_time() - start))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--large-copies", type=int, default=4)
    p.add_argument("--ranks", default="8,64,512,1024,4096")
    p.add_argument("--paced-steps", type=int, default=32, help="micro-batches of the paced run at 1,024 ranks (0: none)")
    p.add_argument("--paced-step-s", type=float, default=2.5,
                   help="its seconds a global micro-batch: slower than 2 cores tokenize 1,024 x 4 rows of 512")
    p.add_argument("--router-alone", action="store_true", help="only one rank's routing alone in a process, no Ray")
    p.add_argument("--paced-only", action="store_true", help="only the paced run at 1,024 ranks (data_stream_paced.json)")
    args = p.parse_args()
    if args.router_alone:
        print(json.dumps([router_alone(int(w)) for w in args.ranks.split(",")]))
        return
    import ray

    if args.paced_only:
        shard_dir, tok = stdlib_corpus()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        paced = many_ranks(spec_of(shard_dir, tok, args.cpus, args.tasks, None), NEED_RANKS, steps=args.paced_steps,
                           take_rows=False, step_s=args.paced_step_s)
        ray.shutdown()
        emit("data_stream_paced", {"paced_at_need_ranks": paced, "need": need_figures(paced)})
        return

    from llmray.data.corpus import list_shards

    shard_dir, tok = stdlib_corpus()
    shards = [s.path for s in list_shards(shard_dir)]
    base_tokens, base_s = baseline(shards, tok, args.cpus)
    base_tps = base_tokens / base_s
    large_dir, _ = stdlib_corpus(copies=args.large_copies)
    large_base_tokens, large_base_s = baseline([s.path for s in list_shards(large_dir)], tok, args.cpus)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    one_rank(spec_of(shard_dir, tok, args.cpus, args.tasks, 1))  # warm-up: tokenize workers started, tokenizer loaded
    one_tokens, one_s = one_rank(spec_of(shard_dir, tok, args.cpus, args.tasks, 1))
    many_tokens, many_s = one_rank(spec_of(shard_dir, tok, args.cpus, args.tasks, args.epochs))
    marginal = (many_tokens - one_tokens) / (many_s - one_s)
    large_tokens, large_s = one_rank(spec_of(large_dir, tok, args.cpus, args.tasks, 1))
    large_ratio = (large_tokens / large_s) / (large_base_tokens / large_base_s)
    ranks = []
    for world in [int(w) for w in args.ranks.split(",")]:
        ranks.append(many_ranks(spec_of(shard_dir, tok, args.cpus, args.tasks, None), world,
                                steps=max(3, 320 // world), take_rows=world <= 64))
        print(json.dumps(ranks[-1]), flush=True)
    paced = None
    if args.paced_steps:
        paced = many_ranks(spec_of(shard_dir, tok, args.cpus, args.tasks, None), NEED_RANKS, steps=args.paced_steps,
                           take_rows=False, step_s=args.paced_step_s)
        print(json.dumps(paced), flush=True)
    ray.shutdown()
    at = paced or min(ranks, key=lambda r: abs(r["ranks"] - NEED_RANKS))
    emit("data_stream", {
        "corpus_shards": len(shards), "cpus": args.cpus, "tokenize_tasks": args.tasks, "seq_len": SEQ,
        "marginal_note": "every epoch is tokenized again; the one- and three-epoch runs follow a warm-up run",
        "baseline_encode_batch_tokens_per_s": round(base_tps), "baseline_tokens": base_tokens,
        "ray_stream_one_epoch_tokens_per_s": round(one_tokens / one_s), "ray_stream_one_epoch_s": round(one_s, 2),
        "ray_stream_marginal_tokens_per_s": round(marginal), "epochs_for_marginal": args.epochs,
        "ratio_one_epoch_incl_startup": round(one_tokens / one_s / base_tps, 3),
        "ratio_marginal": round(marginal / base_tps, 3),
        "large_corpus": {"copies": args.large_copies, "tokens": large_tokens, "one_epoch_s": round(large_s, 2),
                         "baseline_encode_batch_tokens_per_s": round(large_base_tokens / large_base_s),
                         "ratio_one_epoch_incl_startup": round(large_ratio, 3)},
        "simulated_ranks": ranks, "paced_at_need_ranks": paced,
        "per_rank_routable_max_over_min": round(max(r["routable_samples_per_s_per_rank"] for r in ranks)
                                                / min(r["routable_samples_per_s_per_rank"] for r in ranks), 2),
        "need": need_figures(at),
    })


def need_figures(at: dict) -> dict:
    """What 1,024 H100s training a 1B model consume, against what the stream could route in the run `at`: the ranks'
    routing (scaled to 1,024 ranks) or the catalog, whichever is less."""
    need = NEED_RANKS * RANK_TOKENS_PER_S / SEQ
    routable = min(at["routable_samples_per_s_total"] * NEED_RANKS / at["ranks"], at["catalog_servable_samples_per_s"])
    return {"rank_tokens_per_s": round(RANK_TOKENS_PER_S), "inputs": "45% MFU x 989 TFLOP/s (H100 dense bf16) / "
            "(6 x 1e9 parameters)", "ranks": NEED_RANKS, "samples_per_s": round(need),
            "stream_routable_samples_per_s": round(routable), "routable_over_needed": round(routable / need, 2),
            "measured_on": "a paced run (steady state)" if at.get("paced_step_s") else f"{at['ranks']} ranks, unpaced"}


if __name__ == "__main__":
    main()
