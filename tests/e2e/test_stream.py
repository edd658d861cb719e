"""The mixing token stream on a real Ray cluster: exact tokenization packed with EOS, every stretch of global batches
drawn from across the corpus, global batches independent of the world size, a validation split held out by
document, seeded shuffles, exact resumption at a position, and weighted blends of sources."""

import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from llmray.data.catalog import CatalogActor
from llmray.data.corpus import list_shards
from llmray.data.pack import Packer, StreamSpec, first_samples
from llmray.data.split import Documents, is_val_doc
from llmray.data.stream import RankStream
from llmray.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.ray

SEQ = 32


def spec_for(corpus, split="all", val_fraction=0.0, seed=7, max_epochs=1):
    return StreamSpec.of([("corpus", 1.0, Documents(corpus["shards"], split, val_fraction))], corpus["tokenizer"],
                         SEQ, seed, batch_docs=512, max_epochs=max_epochs)


def reference_rows(spec):
    """Per piece: its documents tokenized one by one, EOS after each, cut into seq_len rows."""
    tok = load_tokenizer(spec.tokenizer)
    out = {}
    for source in spec.sources:
        tables = {path: pq.read_table(path, columns=["text"]).column(0).to_pylist() for path in source.shards}
        for p, (shard, start, stop) in enumerate(source.pieces):
            ids = []
            for text in tables[source.shards[shard]][start:stop]:
                ids += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            n = len(ids) // SEQ
            out[source.first_piece + p] = (int(shard), np.array(ids[: n * SEQ]).reshape(n, SEQ))
    return out


def drain(spec, world, rows, start=None, coord=None):
    """Every global micro-batch of a group of `world` ranks, each with the stream's position after it."""
    coord = coord or CatalogActor.remote(spec)
    session = uuid.uuid4().hex  # a new group: the catalog restarts the pipeline where the group starts
    streams = [RankStream(coord, session, r, world, rows, prefetch=4) for r in range(world)]
    for stream in streams:
        stream.load_state_dict(start or {})
    steps = []
    for batches in zip(*streams):
        cursors = [stream.state_dict() for stream in streams]
        assert all(c == cursors[0] for c in cursors)
        steps.append({**{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, "cursor": cursors[0]})
    return steps


def test_stream_is_exact_tokenization_packed_with_eos_and_mixes_the_whole_corpus(corpus, ray_cluster):
    spec = spec_for(corpus)
    ref = reference_rows(spec)
    steps = drain(spec, world=1, rows=16)
    rows = {k: np.concatenate([s[k] for s in steps]) for k in steps[0] if k != "cursor"}
    total = sum(len(r) for _, r in ref.values())
    assert len(rows["input_ids"]) == total - total % 16  # only the last partial global batch is held back
    seen = set()
    for ids, piece, sample in zip(rows["input_ids"], rows["piece"], rows["sample"]):
        np.testing.assert_array_equal(ids, ref[piece][1][sample])
        seen.add((int(piece), int(sample)))
    assert len(seen) == len(rows["input_ids"])  # nothing repeated
    eos = load_tokenizer(spec.tokenizer).eos_token_id
    assert (rows["input_ids"] == eos).sum() > 0  # documents inside a piece are separated by EOS (as in the reference)
    # Every global batch draws from several shards, not from one shard after another.
    n_shards = len(spec.sources[0].shards)
    assert n_shards >= 3
    for step in steps:
        assert len({ref[p][0] for p in step["piece"]}) >= 2, "a global batch came from a single shard"


def test_global_batches_do_not_depend_on_world_size(corpus, ray_cluster):
    spec = spec_for(corpus, max_epochs=2)
    one = drain(spec, world=1, rows=8)
    two = drain(spec, world=2, rows=4)
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    epochs = np.concatenate([s["epoch"] for s in one])
    assert set(epochs.tolist()) == {0, 1}  # epochs chain without a gap
    ids = np.concatenate([s["input_ids"] for s in one])
    e0, e1 = ids[epochs == 0], ids[epochs == 1]
    n = min(len(e0), len(e1))  # the held-back partial batch shortens the last epoch
    assert {r.tobytes() for r in e1[:n]} <= {r.tobytes() for r in e0}  # each epoch is the same samples...
    assert not np.array_equal(e0[:n], e1[:n])  # ...in a new order


def test_validation_split_is_held_out_by_document(corpus, ray_cluster):
    docs = [d for s in list_shards(corpus["shards"]) for d in pq.read_table(s.path).column("doc_id").to_pylist()]
    held = [d for d in docs if is_val_doc(d, 0.2)]
    assert 0 < len(held) < len(docs) * 0.5
    val = first_samples(spec_for(corpus, split="val", val_fraction=0.2), 10)
    train = drain(spec_for(corpus, split="train", val_fraction=0.2), world=1, rows=8)
    train_rows = {r.tobytes() for s in train for r in s["input_ids"]}
    assert val.shape == (10, SEQ)
    assert not any(r.tobytes() in train_rows for r in val)


def test_shuffle_depends_on_seed(corpus, ray_cluster):
    a = drain(spec_for(corpus), world=1, rows=8)[0]["input_ids"]
    b = drain(spec_for(corpus, seed=8), world=1, rows=8)[0]["input_ids"]
    assert not np.array_equal(a, b)


def test_stream_resumes_exactly_at_a_position_for_any_world_size(corpus, ray_cluster):
    """Restarting at the position a micro-batch leaves yields exactly the rest of the stream: the remainder of
    a block, the later blocks, the next epoch, on the same or a different number of ranks."""
    spec = spec_for(corpus, max_epochs=2)
    full = drain(spec, world=1, rows=8)
    ids = np.concatenate([s["input_ids"] for s in full])
    coord = CatalogActor.remote(spec)  # one catalog, restarted in place as a recovered run does
    boundary = max(k for k, s in enumerate(full) if s["epoch"][0] == 0)  # the batch that ends epoch 0
    for k in (0, 5, boundary):
        cursor = full[k]["cursor"]
        assert set(cursor) == {"sources", "counts"}  # a position independent of the world size
        rest = drain(spec, world=2, rows=4, start=cursor, coord=coord)
        got = np.concatenate([s["input_ids"] for s in rest])
        np.testing.assert_array_equal(got, ids[(k + 1) * 8:])


def test_a_blend_keeps_each_source_at_its_weight_and_cycles_a_small_source(corpus, ray_cluster, tmp_path):
    """Two sources, 0.7 and 0.3: every window of 100 global batches holds each within 2 points of its weight; the
    small source runs out first and starts its next epoch while the large one is still in its first."""
    shards = list_shards(corpus["shards"])
    small = tmp_path / "small"
    small.mkdir()
    table = pq.read_table(shards[0].path)
    keep, size = [], 0
    for i, text in enumerate(table.column("text").to_pylist()):  # ~15 KB of documents: a few hundred rows
        if size < 15_000 and len(text) < 8_000:
            keep.append(i)
            size += len(text)
    pq.write_table(table.take(keep), small / "shard-00000.parquet")
    spec = StreamSpec.of([("big", 0.7, Documents(corpus["shards"])), ("small", 0.3, Documents(str(small)))],
                         corpus["tokenizer"], SEQ, 7, batch_docs=512)
    batches, rows = 220, 8
    coord = CatalogActor.remote(spec)
    stream = RankStream(coord, uuid.uuid4().hex, 0, 1, rows, prefetch=16)
    steps = [next(stream) for _ in range(batches)]
    source = np.array([s["source"] for s in steps])  # (batches, rows)
    for start in range(0, batches - 100 + 1, 10):
        share = (source[start:start + 100] == 1).mean()
        assert abs(share - 0.3) <= 0.02, (start, share)
    epochs = np.array([s["epoch"] for s in steps])
    assert epochs[source == 1].max() >= 1  # the small source started its next epoch...
    assert epochs[source == 0].max() == 0  # ...while the big one is still in its first
    small_ids = [(e, p, s) for step in steps for e, p, s, src in zip(step["epoch"], step["piece"], step["sample"],
                                                                       step["source"]) if src == 1]
    first_epoch = [x for x in small_ids if x[0] == 0]
    assert len(first_epoch) == len(set(first_epoch))  # within an epoch, no sample twice


def test_a_source_too_short_for_one_sample_is_an_error_not_an_endless_stream(corpus, ray_cluster):
    spec = StreamSpec.of([("corpus", 1.0, Documents(corpus["shards"]))], corpus["tokenizer"], 1_000_000, 7,
                         batch_docs=512)  # no piece holds a million tokens; with no max_epochs it would cycle forever
    stream = RankStream(CatalogActor.remote(spec), uuid.uuid4().hex, 0, 1, 4, prefetch=4)
    with pytest.raises(Exception, match="yield no 1000000-token sample"):
        next(stream)


def todays_order(spec, world, rows):
    """The ids (source, epoch, piece, sample) of every global micro-batch as the single-coordinator stream routed
    them before issue 31, rebuilt here without Ray: the blend walked row by row (the largest deficit first, ties to
    the first source), each source's blocks in order, each block's rows in its seeded order, and the stream ending
    at the first global micro-batch a source that has ended cannot fill. Kept as the reference the distributed
    routing must equal."""
    packer, weights = Packer(spec), np.array(spec.weights)
    counts = np.zeros(len(weights), dtype=np.int64)
    blocks = [[(e, b) for e in range(spec.max_epochs) for b in range(s.n_blocks)] for s in spec.sources]
    rows_of = [[] for _ in spec.sources]  # per source: ids of its rows made so far, in stream order

    def row(i, j):
        while len(rows_of[i]) <= j:
            if not blocks[i]:
                return None
            made = packer.block(i, *blocks[i].pop(0))
            rows_of[i] += list(zip(made["source"], made["epoch"], made["piece"], made["sample"]))
        return rows_of[i][j]

    batches = []
    while True:
        batch = []
        for _ in range(world * rows):
            s = int(np.argmax(weights * (counts.sum() + 1) - counts))
            counts[s] += 1
            batch.append(row(s, counts[s] - 1))
        if any(r is None for r in batch):
            return batches
        batches.append([tuple(int(x) for x in r) for r in batch])


@pytest.mark.parametrize("weights", [(1.0,), (0.5, 0.3, 0.2)])
def test_sample_ids_equal_todays_order_at_1_2_and_8_ranks(corpus, ray_cluster, weights):
    """At a fixed seed, every global micro-batch holds the samples, in the order, of the stream before issue 31."""
    spec = StreamSpec.of([(f"s{i}", w, Documents(corpus["shards"])) for i, w in enumerate(weights)],
                         corpus["tokenizer"], SEQ, 7, batch_docs=512, max_epochs=1)
    for world, rows in ((1, 8), (2, 4), (8, 1)):
        expected = todays_order(spec, world, rows)
        got = [[tuple(int(x) for x in r) for r in zip(s["source"], s["epoch"], s["piece"], s["sample"])]
               for s in drain(spec, world, rows)]
        assert len(got) == len(expected) > 10
        assert got == expected, world


def test_a_lost_catalog_is_recovered_without_a_wrong_or_repeated_sample(corpus, ray_cluster):
    """The catalog actor killed mid-stream (Ray restarts it; the refs its pipeline owned are lost with it): the ranks
    re-list the blocks they still need from the new incarnation, which packs them again, and the stream goes on with
    exactly the samples of an uninterrupted one."""
    import ray

    spec = spec_for(corpus, max_epochs=6)  # blocks after the kill beyond what the ranks have listed (4 ahead)
    ids = lambda step: list(zip(step["epoch"].tolist(), step["piece"].tolist(), step["sample"].tolist()))  # noqa: E731
    expected = [ids(s) for s in drain(spec, world=2, rows=4)]
    catalog, session = CatalogActor.remote(spec), uuid.uuid4().hex
    streams = [RankStream(catalog, session, r, 2, 4, prefetch=4) for r in range(2)]
    # killed 2 micro-batches before epoch 1's first: the ranks have listed its block (they ask 4 ahead), not fetched it
    kill_at = next(k for k, step in enumerate(expected) if step[-1][0] == 1) - 2
    got = []
    for k, batches in enumerate(zip(*streams)):
        got.append([x for b in batches for x in ids(b)])
        if k == kill_at:
            ray.wait([s.request for s in streams if s.request is not None], num_returns=2)  # listed, then lost
            ray.kill(catalog, no_restart=False)
    assert got == expected
    assert all(s.renewals > 0 for s in streams)  # refs owned by the lost catalog were listed again
