"""The token stream: Ray Data tokenizes and packs shards on the fly; each Train worker gets its slice, in order.

    shards ─► from_items (one row per shard, order seeded per epoch)
           ─► map_batches(TokenizePack, actor pool)   tokenizer loaded once per actor; EOS between documents;
                                                      packed into seq_len blocks; shuffled within chunks, seeded
           ─► StreamCoordinator (one actor)          cuts the ordered stream into global micro-batches and
                                                      hands rank r rows [r*m, (r+1)*m) of each
           ─► RankStream on each worker              prefetching iterator of micro-batches; its
                                                      state_dict() is the position a checkpoint stores

Why not `streaming_split`: it hands blocks to whichever worker asks first, so which sample lands on which
rank, and in what order, changes from run to run (ray #58658). Here the global order is a function of the
seed alone: the same global batch reaches 1 worker or 8, and a run can later resume at an exact position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict
from typing import Iterator

import numpy as np
import ray

from llmray import logs
from llmray.data.pack import StreamCursor, StreamSpec, TokenizePack


def build_dataset(spec: StreamSpec, epoch: int, start: StreamCursor | None = None) -> "ray.data.Dataset":
    """One epoch of the packed stream, as a Ray Dataset whose output order is fixed. With `start` (in this
    epoch), shards before it are not read and the first `start.offset` samples of its shard are dropped."""
    order = spec.shard_order(epoch)
    first = start.position if start is not None else 0
    items = [{"path": spec.shards[order[pos]], "position": pos, "epoch": epoch, "skip": 0}
             for pos in range(first, len(order))]
    if start is not None:  # a cursor always points into a shard: at the end of one, its offset is its count
        items[0]["skip"] = start.offset
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
    return ds


def iter_epochs(spec: StreamSpec, start: StreamCursor | None = None) -> Iterator[dict]:
    """Packed-sample blocks from `start` (default: the beginning) over as many epochs as the spec allows
    (endless when max_epochs is None)."""
    epoch = start.epoch if start is not None else 0
    while spec.max_epochs is None or epoch < spec.max_epochs:
        resumed = start is not None and epoch == start.epoch
        produced = 0
        ds = build_dataset(spec, epoch, start if resumed else None)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            produced += len(batch["input_ids"])
            yield batch
        if produced == 0 and not resumed:
            raise ValueError(f"the {spec.documents.part} documents of {spec.documents.location} hold fewer than "
                             f"seq_len={spec.seq_len} tokens")
        epoch += 1


@ray.remote(num_cpus=0)
class StreamCoordinator:
    """Cuts the ordered stream into global micro-batches of `world_size * rows_per_rank` rows.

    Rank r receives rows [r*m, (r+1)*m) of each, so a step's global batch is the same set of samples for
    any world size. Each micro-batch carries the cursor just past it, the stream position a checkpoint stores.
    A worker group opens a session with the cursor it resumes from (all its ranks pass the same session id);
    a new session (a restarted or resized group) drops everything read ahead and restarts the stream there.
    """

    def __init__(self, spec: StreamSpec):
        logs.quiet_here()
        self.spec = spec
        self.session: str | None = None

    def open(self, session: str, start: StreamCursor | None, world_size: int, rows_per_rank: int) -> None:
        if session == self.session:
            return
        if self.session is not None:
            self.blocks.close()  # stops the abandoned Ray Data execution
        self.session, self.world, self.rows = session, world_size, rows_per_rank
        self.blocks = iter_epochs(self.spec, start)
        self.queues: list[deque] = [deque() for _ in range(world_size)]
        self.buffer: dict | None = None
        self.done = False

    def _take(self, need: int) -> dict | None:
        parts, have = ([self.buffer], len(self.buffer["input_ids"])) if self.buffer else ([], 0)
        while have < need and not self.done:
            try:
                block = next(self.blocks)
            except StopIteration:
                self.done = True
                break
            parts.append(block)
            have += len(block["input_ids"])
        if have < need:  # end of the last epoch: a partial global batch would desync ranks
            self.buffer = None
            return None
        merged = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.buffer = {k: v[need:] for k, v in merged.items()} if have > need else None
        return {k: v[:need] for k, v in merged.items()}

    def _fill(self) -> None:
        head = self._take(self.world * self.rows)
        if head is None:
            for q in self.queues:
                q.append(None)
            return
        cursor = StreamCursor.after(head["epoch"][-1], head["position"][-1], head["offset"][-1])
        for r, q in enumerate(self.queues):
            part = {k: v[r * self.rows:(r + 1) * self.rows] for k, v in head.items()}
            part["cursor"] = cursor
            q.append(part)

    def next(self, session: str, rank: int) -> dict | None:
        if session != self.session:
            raise RuntimeError(f"stream session {session} was replaced by {self.session}")
        if not self.queues[rank]:
            self._fill()
        return self.queues[rank].popleft()


class RankStream:
    """A worker's view of the stream: an iterator of its micro-batches, prefetched, and the stream's position.

    Stateful in torchtitan's sense: `state_dict()` is the position after the last micro-batch this rank took
    (the same on every rank after a step), what a checkpoint stores; `load_state_dict()` before the first batch
    starts the stream there. The first `next()` opens this worker group's session on the coordinator.
    """

    def __init__(self, coordinator, session: str, rank: int, world_size: int, rows_per_rank: int, prefetch: int):
        self.coord, self.session, self.rank = coordinator, session, rank
        self.world_size, self.rows_per_rank, self.prefetch = world_size, rows_per_rank, prefetch
        self.position: StreamCursor | None = None  # None: the beginning
        self.inflight: deque | None = None  # None: the session is not open yet

    def state_dict(self) -> dict:
        return asdict(self.position) if self.position is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inflight is not None:
            raise RuntimeError("a stream's position can only be set before its first batch")
        self.position = StreamCursor(**state) if state else None

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.inflight is None:
            ray.get(self.coord.open.remote(self.session, self.position, self.world_size, self.rows_per_rank))
            self.inflight = deque()
        while len(self.inflight) < self.prefetch:
            self.inflight.append(self.coord.next.remote(self.session, self.rank))
        batch = ray.get(self.inflight.popleft())
        if batch is None:
            raise StopIteration
        self.position = batch.pop("cursor")
        return batch
