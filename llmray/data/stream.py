"""The token stream: Ray Data tokenizes and packs shards on the fly; each Train worker gets its slice, in order.

    shards ─► from_items (one row per shard, order seeded per epoch)
           ─► map_batches(TokenizePack, actor pool)   tokenizer loaded once per actor; EOS between documents;
                                                      packed into seq_len blocks; shuffled within chunks, seeded
           ─► StreamCoordinator (one actor)          cuts the ordered stream into global micro-batches and
                                                      hands rank r rows [r*m, (r+1)*m) of each
           ─► RankStream on each worker              prefetching iterator of torch tensors

Why not `streaming_split`: it hands blocks to whichever worker asks first, so which sample lands on which
rank, and in what order, changes from run to run (ray #58658). Here the global order is a function of the
seed alone: the same global batch reaches 1 worker or 8, and a run can later resume at an exact position.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import ray

from llmray.data import storage

VAL_BUCKETS = 10_000
CHUNK_SAMPLES = 512  # packed samples per yielded block: the unit of Ray Data transfer and of shuffling


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the stream's content and order."""

    shards: tuple[str, ...]
    tokenizer: str
    seq_len: int
    seed: int
    split: str = "train"  # "train": documents outside the held-out fraction; "val": inside it; "all": every one
    val_fraction: float = 0.0
    batch_docs: int = 512
    actors: int = 1
    cpus_per_actor: float = 1.0
    max_epochs: int | None = None

    def shard_order(self, epoch: int) -> list[int]:
        """Shard visiting order for an epoch: a seeded permutation, identical on every run."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()


def is_val_doc(doc_id: str, fraction: float) -> bool:
    return zlib.crc32(doc_id.encode()) % VAL_BUCKETS < fraction * VAL_BUCKETS


class TokenizePack:
    """Ray Data actor: one shard in, its documents tokenized and packed into `seq_len` blocks out."""

    def __init__(self, spec: StreamSpec):
        from llmray.data.tokenizer import load_tokenizer

        self.spec = spec
        hf = load_tokenizer(spec.tokenizer)
        self.backend = hf.backend_tokenizer
        self.eos = np.array([hf.eos_token_id], dtype=np.int32)

    def _texts(self, path: str) -> Iterator[list[str]]:
        fs, p = storage.resolve(path)
        pf = pq.ParquetFile(fs.open_input_file(p))
        columns = ["text", "doc_id"] if "doc_id" in pf.schema_arrow.names and self.spec.split != "all" else ["text"]
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=self.spec.batch_docs):
            texts = batch.column(0).to_pylist()
            if self.spec.split != "all":
                ids = batch.column(1).to_pylist() if len(columns) == 2 else [f"{path}#{row + i}" for i in range(len(texts))]
                want_val = self.spec.split == "val"
                texts = [t for t, d in zip(texts, ids) if is_val_doc(d, self.spec.val_fraction) == want_val]
            row += batch.num_rows
            yield [t for t in texts if t]

    def __call__(self, item: dict) -> Iterator[dict]:
        path, position, epoch = item["path"][0], int(item["position"][0]), int(item["epoch"][0])
        seq_len = self.spec.seq_len
        pending: list[np.ndarray] = []
        pending_len = 0
        emitted = chunk = 0
        for texts in self._texts(path):
            if not texts:
                continue
            for enc in self.backend.encode_batch_fast(texts, add_special_tokens=False):
                pending.append(np.asarray(enc.ids, dtype=np.int32))
                pending.append(self.eos)
                pending_len += len(enc.ids) + 1
            if pending_len < seq_len * CHUNK_SAMPLES:
                continue
            flat = np.concatenate(pending)
            n = len(flat) // seq_len
            pending, pending_len = [flat[n * seq_len:]], len(flat) - n * seq_len
            for start in range(0, n, CHUNK_SAMPLES):
                block = flat[start * seq_len: min(n, start + CHUNK_SAMPLES) * seq_len].reshape(-1, seq_len)
                yield self._chunk(block, position, epoch, emitted, chunk)
                emitted += len(block)
                chunk += 1
        if pending_len >= seq_len:  # the shard's tail; what is left under seq_len is dropped
            flat = np.concatenate(pending)
            n = len(flat) // seq_len
            yield self._chunk(flat[: n * seq_len].reshape(n, seq_len), position, epoch, emitted, chunk)

    def _chunk(self, block: np.ndarray, position: int, epoch: int, first: int, chunk: int) -> dict:
        order = np.random.default_rng([self.spec.seed, epoch, position, chunk]).permutation(len(block))
        n = len(block)
        return {
            "input_ids": block[order],
            "epoch": np.full(n, epoch, dtype=np.int32),
            "position": np.full(n, position, dtype=np.int32),  # index of the shard in this epoch's order
            "sample": (first + order).astype(np.int64),  # index of the packed sample within its shard
        }


def build_dataset(spec: StreamSpec, epoch: int) -> "ray.data.Dataset":
    """One epoch of the packed stream, as a Ray Dataset whose output order is fixed."""
    order = spec.shard_order(epoch)
    items = [{"path": spec.shards[i], "position": pos, "epoch": epoch} for pos, i in enumerate(order)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        TokenizePack,
        fn_constructor_kwargs={"spec": spec},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(spec.actors, len(items))),
        num_cpus=spec.cpus_per_actor,
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False  # training prints its own progress; Ray Data's bars flood the log
    return ds


def iter_epochs(spec: StreamSpec) -> Iterator[dict]:
    """Packed-sample blocks over as many epochs as the spec allows (endless when max_epochs is None)."""
    epoch = 0
    while spec.max_epochs is None or epoch < spec.max_epochs:
        produced = 0
        for batch in build_dataset(spec, epoch).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            produced += len(batch["input_ids"])
            yield batch
        if produced == 0:
            raise ValueError(f"the {spec.split} split of the corpus holds fewer than seq_len={spec.seq_len} tokens")
        epoch += 1


def take_samples(spec: StreamSpec, n: int) -> np.ndarray:
    """The first `n` packed samples of epoch 0 (fewer if the split is smaller): a fixed evaluation set."""
    out, have = [], 0
    for batch in build_dataset(spec, 0).iter_batches(batch_size=None, batch_format="numpy"):
        out.append(batch["input_ids"])
        have += len(batch["input_ids"])
        if have >= n:
            break
    if not out:
        return np.zeros((0, spec.seq_len), dtype=np.int32)
    return np.concatenate(out)[:n]


@ray.remote(num_cpus=0)
class StreamCoordinator:
    """Cuts the ordered stream into global micro-batches of `world_size * rows_per_rank` rows.

    Rank r receives rows [r*m, (r+1)*m) of each, so a step's global batch is the same set of samples for
    any world size. Calls from one rank are served in order; the rank keeps several in flight to prefetch.
    """

    def __init__(self, spec: StreamSpec, world_size: int, rows_per_rank: int):
        self.blocks = iter_epochs(spec)
        self.world, self.rows = world_size, rows_per_rank
        self.queues: list[deque] = [deque() for _ in range(world_size)]
        self.buffer: list[dict] = []
        self.buffered = 0
        self.done = False

    def _fill(self) -> None:
        need = self.world * self.rows
        while self.buffered < need and not self.done:
            try:
                block = next(self.blocks)
            except StopIteration:
                self.done = True
                break
            self.buffer.append(block)
            self.buffered += len(block["input_ids"])
        if self.buffered < need:  # end of the last epoch: a partial global batch would desync ranks
            for q in self.queues:
                q.append(None)
            return
        merged = {k: np.concatenate([b[k] for b in self.buffer]) for k in self.buffer[0]}
        head = {k: v[:need] for k, v in merged.items()}
        rest = {k: v[need:] for k, v in merged.items()}
        self.buffer, self.buffered = ([rest], len(rest["input_ids"])) if len(rest["input_ids"]) else ([], 0)
        for r, q in enumerate(self.queues):
            q.append({k: v[r * self.rows:(r + 1) * self.rows] for k, v in head.items()})

    def next(self, rank: int) -> dict | None:
        if not self.queues[rank]:
            self._fill()
        return self.queues[rank].popleft()


class RankStream:
    """A worker's view of the stream: an iterator of micro-batches, prefetched, with the wait time counted."""

    def __init__(self, coordinator, rank: int, prefetch: int = 4):
        self.coord, self.rank, self.prefetch = coordinator, rank, prefetch
        self.wait_seconds = 0.0
        self.inflight: deque = deque()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while len(self.inflight) < self.prefetch:
            self.inflight.append(self.coord.next.remote(self.rank))
        t0 = time.perf_counter()
        batch = ray.get(self.inflight.popleft())
        self.wait_seconds += time.perf_counter() - t0
        if batch is None:
            raise StopIteration
        return batch
