"""The ordered token stream on a real Ray cluster: exact tokenization packed with EOS, global batches independent of
the world size, a validation split held out by document, seeded shuffles, exact resumption at a cursor."""

import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from llmray.data.corpus import list_shards
from llmray.data.pack import StreamSpec, first_samples
from llmray.data.split import Documents, is_val_doc
from llmray.data.stream import RankStream, StreamCoordinator
from llmray.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.ray

SEQ = 32


def spec_for(corpus, split="all", val_fraction=0.0, seed=7, max_epochs=1):
    return StreamSpec.of(Documents(corpus["shards"], split, val_fraction), corpus["tokenizer"], SEQ, seed,
                         batch_docs=512, max_epochs=max_epochs)


def reference_samples(spec):
    """Per shard: its documents tokenized one by one, EOS after each, cut into seq_len rows."""
    tok = load_tokenizer(spec.tokenizer)
    out = []
    for path in spec.shards:
        ids = []
        for text in pq.read_table(path, columns=["text"]).column(0).to_pylist():
            ids += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        n = len(ids) // SEQ
        out.append(np.array(ids[: n * SEQ]).reshape(n, SEQ))
    return out


def drain(spec, world, rows, start=None, coord=None):
    """Every global micro-batch of a group of `world` ranks, each with the stream's position after it."""
    coord = coord or StreamCoordinator.remote(spec)
    session = uuid.uuid4().hex  # a new group: the coordinator restarts the stream where the group starts
    streams = [RankStream(coord, session, r, world, rows, prefetch=4) for r in range(world)]
    for stream in streams:
        stream.load_state_dict(start or {})
    steps = []
    for batches in zip(*streams):
        cursors = [stream.state_dict() for stream in streams]
        assert all(c == cursors[0] for c in cursors)
        steps.append({**{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, "cursor": cursors[0]})
    return steps


def test_stream_is_exact_tokenization_packed_with_eos(corpus, ray_cluster):
    spec = spec_for(corpus)
    ref = reference_samples(spec)
    order = spec.shard_order(0)
    steps = drain(spec, world=1, rows=4)
    rows = {k: np.concatenate([s[k] for s in steps]) for k in steps[0] if k != "cursor"}
    total = sum(len(r) for r in ref)
    assert len(rows["input_ids"]) == total - total % 4  # only the last partial global batch is held back
    seen = set()
    for ids, pos, sample in zip(rows["input_ids"], rows["position"], rows["sample"]):
        np.testing.assert_array_equal(ids, ref[order[pos]][sample])
        seen.add((int(pos), int(sample)))
    assert len(seen) == len(rows["input_ids"])  # nothing repeated
    eos = load_tokenizer(spec.tokenizer).eos_token_id
    assert (rows["input_ids"] == eos).sum() >= len(spec.shards)  # documents are separated by EOS
    assert list(rows["position"][:3]) == [0, 0, 0]  # shards are consumed in the seeded order


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


def test_stream_resumes_exactly_at_a_cursor_for_any_world_size(corpus, ray_cluster):
    """Restarting at the cursor a micro-batch carries yields exactly the rest of the stream: the remainder of
    a shard, the later shards, the next epoch, on the same or a different number of ranks."""
    spec = spec_for(corpus, max_epochs=2)
    full = drain(spec, world=1, rows=8)
    ids = np.concatenate([s["input_ids"] for s in full])
    coord = StreamCoordinator.remote(spec)  # one coordinator, restarted in place as a recovered run does
    boundary = max(k for k, s in enumerate(full) if s["epoch"][0] == 0)  # the batch that ends epoch 0
    for k in (0, 5, boundary):
        cursor = full[k]["cursor"]
        assert set(cursor) == {"epoch", "position", "offset"}  # a position independent of the world size
        rest = drain(spec, world=2, rows=4, start=cursor, coord=coord)
        got = np.concatenate([s["input_ids"] for s in rest])
        np.testing.assert_array_equal(got, ids[(k + 1) * 8:])
