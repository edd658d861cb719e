"""Tokenize and pack one shard: documents in, EOS after each, fixed `seq_len` rows out, shuffled within chunks.

Plain Python with no Ray in it: Ray Data runs it as an actor pool (`stream.py`), and a bare benchmark or a
profiler can call it directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from llmray import storage
from llmray.data.corpus import list_shards
from llmray.data.split import Documents

CHUNK_SAMPLES = 512  # packed samples per yielded block: the unit of Ray Data transfer and of shuffling


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the stream's content and order, and the resources that make it."""

    documents: Documents
    shards: tuple[str, ...]  # the shard files of documents.location, in listing order
    tokenizer: str
    seq_len: int
    seed: int
    batch_docs: int
    actors: int = 1
    cpus_per_actor: float = 1.0
    max_epochs: int | None = None

    @classmethod
    def of(cls, documents: Documents, tokenizer: str, seq_len: int, seed: int, batch_docs: int, **resources
           ) -> "StreamSpec":
        shards = tuple(s.path for s in list_shards(documents.location))
        return cls(documents, shards, tokenizer, seq_len, seed, batch_docs, **resources)

    def shard_order(self, epoch: int) -> list[int]:
        """Shard visiting order for an epoch: a seeded permutation, identical on every run."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()


@dataclass(frozen=True)
class StreamCursor:
    """Where the stream stands: the next sample is output number `offset` of the shard at `position` in
    epoch `epoch`'s shard order. Independent of world size, so a run can resume on more or fewer workers."""

    epoch: int = 0
    position: int = 0
    offset: int = 0

    @classmethod
    def after(cls, epoch: int, position: int, offset: int) -> "StreamCursor":
        return cls(int(epoch), int(position), int(offset) + 1)


class TokenizePack:
    """Ray Data actor: one shard in, its documents tokenized and packed into `seq_len` blocks out."""

    def __init__(self, spec: StreamSpec):
        from llmray.data.tokenizer import load_tokenizer

        # The tokenizer's thread pool gets the CPUs this actor was budgeted, no more (it would steal from training).
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(max(1, int(spec.cpus_per_actor)))
        self.spec = spec
        hf = load_tokenizer(spec.tokenizer)
        self.backend = hf.backend_tokenizer
        self.eos = np.array([hf.eos_token_id], dtype=np.int32)

    def _texts(self, path: str) -> Iterator[list[str]]:
        fs, p = storage.resolve(path)
        pf = pq.ParquetFile(fs.open_input_file(p))
        docs = self.spec.documents
        columns = ["text", "doc_id"] if "doc_id" in pf.schema_arrow.names and docs.part != "all" else ["text"]
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=self.spec.batch_docs):
            texts = batch.column(0).to_pylist()
            if docs.part != "all":
                ids = batch.column(1).to_pylist() if len(columns) == 2 else [f"{path}#{row + i}" for i in range(len(texts))]
                texts = [t for t, d in zip(texts, ids) if docs.wants(d)]
            row += batch.num_rows
            yield [t for t in texts if t]

    def __call__(self, item: dict) -> Iterator[dict]:
        path, position, epoch = item["path"][0], int(item["position"][0]), int(item["epoch"][0])
        skip = int(item["skip"][0]) if "skip" in item else 0  # resuming inside this shard
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
                if emitted + len(block) > skip:
                    yield self._chunk(block, position, epoch, emitted, chunk, skip)
                emitted += len(block)
                chunk += 1
        if pending_len >= seq_len:  # the shard's tail; what is left under seq_len is dropped
            flat = np.concatenate(pending)
            n = len(flat) // seq_len
            if emitted + n > skip:
                yield self._chunk(flat[: n * seq_len].reshape(n, seq_len), position, epoch, emitted, chunk, skip)

    def _chunk(self, block: np.ndarray, position: int, epoch: int, first: int, chunk: int, skip: int) -> dict:
        order = np.random.default_rng([self.spec.seed, epoch, position, chunk]).permutation(len(block))
        keep = slice(max(0, skip - first), None)  # outputs before the resume point were trained on already
        n = len(block)
        return {
            "input_ids": block[order][keep],
            "epoch": np.full(n, epoch, dtype=np.int32)[keep],
            "position": np.full(n, position, dtype=np.int32)[keep],  # index of the shard in this epoch's order
            "sample": (first + order).astype(np.int64)[keep],  # packed sample's index within its shard: its id
            "offset": np.arange(first, first + n, dtype=np.int64)[keep],  # its place in the shard's output order
        }


def first_samples(spec: StreamSpec, n: int) -> np.ndarray:
    """The first `n` packed samples of epoch 0 (fewer if the documents hold fewer), exactly as the stream orders
    them, made here without Ray: the fixed validation set of a run, and what `llmray quantize` measures on."""
    pack, rows, have = TokenizePack(spec), [], 0
    for position, shard in enumerate(spec.shard_order(0)):
        for chunk in pack({"path": [spec.shards[shard]], "position": [position], "epoch": [0]}):
            rows.append(chunk["input_ids"])
            have += len(chunk["input_ids"])
            if have >= n:
                return np.concatenate(rows)[:n]
    return np.concatenate(rows) if rows else np.zeros((0, spec.seq_len), dtype=np.int32)
