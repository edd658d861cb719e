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
from collections import deque
from typing import Iterator

import numpy as np
import ray

from llmray.data.pack import StreamSpec, TokenizePack


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
