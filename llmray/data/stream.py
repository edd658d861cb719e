"""The token stream: Ray Data tokenizes and packs blocks of the whole corpus; each Train worker finds and fetches its rows.

    plan (plan.py)       every source's pieces, per epoch a seeded permutation cut into blocks; the blend's schedule
      ─► catalog.py      one Ray Dataset for the run tokenizes and packs the blocks (shared by all ranks); one small
                         actor lists the packed blocks: their refs and row counts, O(blocks), no sample
      ─► route.py        on each rank: which rows of which blocks are its rows [r*m, (r+1)*m) of each global
                         micro-batch, from the seed, the blend and the listed row counts
      ─► RankStream      (here) on each worker: asks the catalog for the blocks it lacks (ahead of need), fetches
                         the packed runs straight from the object store, gathers its rows; its state_dict() is the
                         position a checkpoint stores

No actor is on the per-sample path: a rank's work per micro-batch is its own rows, and the catalog answers a rank
about once per block. Why not `streaming_split`: it hands blocks to whichever worker asks first, so which sample lands
on which rank, and in what order, changes from run to run (ray #58658). Here the global order is a function of the
seed alone: the same global batch reaches 1 worker or 8, and a run resumes at an exact position on any world size,
re-tokenizing at most one block per source. A lost catalog is restarted by Ray; a rank whose refs it owned are lost
asks the new one, which packs those blocks again: the same rows, so no sample is lost, wrong or repeated.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Iterator

import numpy as np
import ray

from llmray.data.plan import BLOCK_PIECES, PIECE_SAMPLES
from llmray.data.route import Routed, Router

RANK_CACHE_ROWS = 4 * BLOCK_PIECES * PIECE_SAMPLES  # packed rows a rank keeps fetched: about its last few blocks
# and at most this many bytes of them: an image row carries its pixels (a 336 px image: 1.35 MB in fp32), which
# RANK_CACHE_ROWS of would be tens of GB; token rows stay under it (32k rows of 2,048 tokens, 3 int32 columns: 0.8 GB)
RANK_CACHE_BYTES = 2 << 30
# blocks of a source a rank's read-ahead request waits for: fewer requests (at 1,024 ranks a block lasts ~2 global
# micro-batches of 4 rows a rank), for ~4 packed blocks held ahead in the object store (16 MB each at seq 512)
LOOKAHEAD_BLOCKS = 4
LOST_RETRIES = 3  # a micro-batch's packed runs found lost, listed again and fetched again before the stream fails


class RankStream:
    """A worker's view of the stream: an iterator of its micro-batches and the stream's position.

    Stateful in torchtitan's sense: `state_dict()` is the position after the last micro-batch this rank took (the
    same on every rank after a step), what a checkpoint stores; `load_state_dict()` before the first batch starts
    the stream there. All ranks of a worker group pass the same session id; a new session (a restarted or resized
    group) restarts the catalog's pipeline where its ranks ask. `prefetch`: global micro-batches ahead whose blocks
    it asks the catalog for while the current ones train.
    """

    def __init__(self, catalog, session: str, rank: int, world_size: int, micro_batch_size: int, prefetch: int):
        self.catalog, self.session, self.rank = catalog, session, rank
        self.world_size, self.micro_batch_size, self.prefetch = world_size, micro_batch_size, prefetch
        self.position: dict = {}  # {}: the beginning
        self.router: Router | None = None  # made at the first batch
        self.g = 0  # the next global micro-batch, from the session's start
        self.request = None  # a catalog request in flight
        self.incarnation = 0  # the newest catalog incarnation heard from
        self.pending: deque = deque()  # routed micro-batches, not yet gathered
        self.runs: OrderedDict = OrderedDict()  # fetched packed runs of pieces, most recent last
        self.cached_rows = self.cached_bytes = 0
        self.ended = False
        # for benchmarks: catalog requests (re-listings included), re-listings after a lost catalog, CPU seconds
        # spent routing (the waits for the catalog excluded) and rows routed
        self.catalog_calls = self.renewals = 0
        self.route_s, self.rows_routed = 0.0, 0

    def state_dict(self) -> dict:
        return self.position

    def load_state_dict(self, state: dict) -> None:
        if self.router is not None:
            raise RuntimeError("a stream's position can only be set before its first batch")
        self.position = state or {}

    def __iter__(self) -> Iterator[dict]:
        return self

    def _ask(self, wait: list[int], blocks: int = 1, wanted: list | None = None):
        """A catalog request for every source's blocks from `wanted` on (default: after those known), waiting for
        `blocks` blocks of the sources `wait`."""
        self.catalog_calls += 1
        sources = self.router.sources
        return self.catalog.blocks.remote(self.session, self.world_size, self.rank, [s.oldest() for s in sources],
                                          [s.next for s in sources] if wanted is None else wanted,
                                          [blocks if i in wait else 0 for i in range(len(sources))])

    def _learn(self, reply: dict) -> None:
        """Take in a catalog reply; if a newer catalog incarnation sent it (the one before was lost, and the refs it
        owned with it), list again the known blocks whose refs an older one owned."""
        self._add(reply)
        while stale := [next(((b.epoch, b.block) for b in s.blocks if b.incarnation < self.incarnation), None)
                        for s in self.router.sources]:
            if not any(stale):
                break
            self.renewals += 1
            self._add(ray.get(self._ask([i for i, w in enumerate(stale) if w is not None], wanted=stale)))

    def _add(self, reply: dict) -> None:
        for source, blocks in zip(self.router.sources, reply["blocks"]):
            for epoch, block, parts in blocks:
                source.add(epoch, block, parts, reply["incarnation"])
        self.incarnation = max(self.incarnation, reply["incarnation"])

    def _landed(self) -> None:
        """Take in the reply of the request in flight, if it has come."""
        if self.request is not None and ray.wait([self.request], timeout=0)[0]:
            reply, self.request = ray.get(self.request), None
            self._learn(reply)

    def route(self) -> Routed | None:
        """Where this rank's rows of the next global micro-batch are (asking the catalog for blocks it lacks, and
        for those of `prefetch` micro-batches ahead); None at the stream's end. No Ray call when the blocks are
        known: what a benchmark times as routing."""
        router = self.router
        self._landed()
        started = time.thread_time()
        while missing := router.missing(self.g):
            if self.request is None:
                self.request = self._ask(missing)
            self.route_s += time.thread_time() - started  # the wait for the catalog left out
            reply, self.request = ray.get(self.request), None
            started = time.thread_time()
            self._learn(reply)
            if not any(reply["blocks"]):
                raise RuntimeError(f"the stream's catalog has no block {router.sources[missing[0]].next} of "
                                   f"source {missing[0]}")
        routed = router.route(self.g)
        self.g += 1
        ahead = router.missing(self.g + self.prefetch) if self.request is None and routed is not None else None
        self.route_s += time.thread_time() - started
        if routed is not None:
            self.rows_routed += len(routed.rows)
        if ahead:
            self.request = self._ask(ahead, LOOKAHEAD_BLOCKS)  # answered while this micro-batch trains
        return routed

    def _fetch(self, refs: list) -> list[dict[str, np.ndarray]]:
        """The packed runs behind `refs`: those not cached fetched in one call to the object store."""
        from ray.data.block import BlockAccessor

        missing = [ref for ref in refs if ref not in self.runs]
        for ref, table in zip(missing, ray.get(missing) if missing else ()):
            columns = BlockAccessor.for_block(table).to_numpy()
            self.runs[ref] = {c: np.array(v) for c, v in columns.items()}  # copied: the ref's owner may be lost
            self.cached_rows += len(self.runs[ref]["sample"])
            self.cached_bytes += sum(v.nbytes for v in self.runs[ref].values())
        for ref in refs:
            self.runs.move_to_end(ref)
        while (self.cached_rows > RANK_CACHE_ROWS or self.cached_bytes > RANK_CACHE_BYTES) and \
                len(self.runs) > len(refs):  # oldest first, never these (a dropped run still needed is fetched again)
            _, dropped = self.runs.popitem(last=False)
            self.cached_rows -= len(dropped["sample"])
            self.cached_bytes -= sum(v.nbytes for v in dropped.values())
        return [self.runs[ref] for ref in refs]

    def _gather(self, routed: Routed) -> dict:
        for attempt in range(LOST_RETRIES + 1):
            try:
                runs = self._fetch(routed.refs)
                break
            except ray.exceptions.ObjectLostError:  # its owner, the catalog, was lost: a new one lists it again
                if attempt == LOST_RETRIES:
                    raise
                if self.request is None:
                    self.request = self._ask([])
                reply, self.request = ray.get(self.request), None
                self._learn(reply)
                routed = self.router.route(self.g - 1)  # the same rows, under the new refs
        which, rows = routed.which, routed.rows
        batch = {}
        for c in runs[0]:
            first = runs[0][c]
            # a text column (an RL prompt's fields) as objects: each run's strings have their own width
            out = np.empty((len(rows), *first.shape[1:]), dtype=object if first.dtype.kind in "OU" else first.dtype)
            for p, run in enumerate(runs):  # each run's rows in one gather
                mine = which == p
                out[mine] = run[c][rows[mine]]
            batch[c] = out
        return batch

    def __next__(self) -> dict:
        if self.ended:
            raise StopIteration
        if self.router is None:
            layout = ray.get(self.catalog.layout.remote())
            self.router = Router(layout, self.position, self.world_size, self.micro_batch_size, self.rank)
        routed = self.route()
        if routed is None:
            self.ended = True
            raise StopIteration
        batch = self._gather(routed)
        self.position = routed.position
        return batch
