"""A rank's own rows, worked out on the rank from the seed, the plan and the packed blocks' row counts (no Ray).

    global micro-batch g of a session: global rows [g·W·m, (g+1)·W·m) from the position it opened at; rank r's are
    [g·W·m + r·m, g·W·m + (r+1)·m)
      ─► the blend (plan.Schedule): the source of each of those rows, and each source's count before them, as a jump
      ─► the source's blocks, in order, with their row counts (the catalog's metadata): which block holds the
         source's j-th row from the session's start, and which row of it, in the block's seeded order
         (plan.block_row_order, as pack.Packer.block orders them)
      ─► (ref of the packed run, row in it) of each of the rank's rows

A rank's work per micro-batch is its own m rows, whatever the world size (with one or two sources: three or more
walk the blend over the global micro-batch). The position after a global micro-batch (`position_state`) is the same
on every rank, and has the single-coordinator stream's format: each source's cursor and the blend's counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from llmray.data.plan import Schedule, block_row_order


@dataclass
class SourceCursor:
    """Where one source stands: the next row is row `offset` of block `block` of its epoch `epoch`."""

    epoch: int = 0
    block: int = 0
    offset: int = 0


def position_state(cursors: list[SourceCursor], counts) -> dict:
    """The stream's position as a checkpoint stores it (independent of the world size)."""
    return {"sources": [vars(c).copy() for c in cursors], "counts": [int(c) for c in counts]}


def read_position(state: dict | None, n_sources: int) -> tuple[list[SourceCursor], list[int]]:
    if not state:
        return [SourceCursor() for _ in range(n_sources)], [0] * n_sources
    if "sources" not in state or len(state["sources"]) != n_sources:
        raise ValueError(f"stream position {state} does not fit a stream of {n_sources} sources")
    return [SourceCursor(**c) for c in state["sources"]], list(state["counts"])


def next_block(n_blocks: int, max_epochs: int | None, epoch: int, block: int) -> tuple[int, int] | None:
    """The block after (epoch, block) of a source of `n_blocks` blocks an epoch; None when the source may not start
    another epoch."""
    if block + 1 < n_blocks:
        return epoch, block + 1
    if max_epochs is not None and epoch + 1 >= max_epochs:
        return None
    return epoch + 1, 0


@dataclass(frozen=True)
class Layout:
    """What a rank needs of the stream's spec to route its rows: a few numbers per source, not its pieces."""

    seed: int
    weights: tuple[float, ...]
    n_blocks: tuple[int, ...]
    max_epochs: int | None
    empty: tuple[str, ...]  # per source: the error raised when an epoch of it yields no sample

    @classmethod
    def of(cls, spec) -> "Layout":
        return cls(spec.seed, tuple(spec.weights), tuple(s.n_blocks for s in spec.sources), spec.max_epochs,
                   tuple(f"source {s.name!r}: its documents ({s.documents.part} of {s.documents.location}) yield no "
                         f"{spec.seq_len}-token sample" for s in spec.sources))


@lru_cache(maxsize=64)
def shared_order(seed: int, index: int, epoch: int, block: int, rows: int) -> np.ndarray:
    """A block's row order, drawn once per process: ranks (threads) of one process read the same blocks."""
    order = block_row_order(seed, index, epoch, block, rows)
    order.flags.writeable = False
    return order


class KnownBlock:
    """A packed block as the catalog reported it: (ref, rows) of each run of its pieces, in block order, and the
    catalog incarnation that owns the refs."""

    def __init__(self, seed: int, index: int, epoch: int, block: int, parts: list[tuple], incarnation: int):
        self.seed, self.index, self.epoch, self.block, self.incarnation = seed, index, epoch, block, incarnation
        self.refs = [ref for ref, _ in parts]
        self.starts = np.cumsum([0] + [rows for _, rows in parts])
        self.rows = int(self.starts[-1])

    @property
    def order(self) -> np.ndarray:
        return shared_order(self.seed, self.index, self.epoch, self.block, self.rows)


class SourceRows:
    """One source's blocks from the session's start, in order: its row j (counted from the session's first row of
    it) -> a block and a row of it. The first block is the session cursor's, entered at its offset."""

    def __init__(self, layout: Layout, index: int, cursor: SourceCursor):
        self.layout, self.index, self.cursor = layout, index, cursor
        self.blocks: list[KnownBlock] = []
        # the session row each known block's row 0 is (the first block's is -offset), and where the last one ends
        self.starts = np.array([-cursor.offset], dtype=np.int64)
        self.ended = False  # no block follows the known ones
        # rows the source's current epoch has yielded (None: the session joined it midway, not counted)
        self.epoch_rows = 0 if (cursor.block, cursor.offset) == (0, 0) else None
        self.next = (cursor.epoch, cursor.block)  # the block to learn next (None: the source has no more)

    def oldest(self) -> tuple[int, int]:
        """The earliest block this rank may still read."""
        return (self.blocks[0].epoch, self.blocks[0].block) if self.blocks else self.next

    def rows(self) -> int:
        """The source's rows known from the session's start."""
        return int(self.starts[-1])

    def add(self, epoch: int, block: int, parts: list[tuple], incarnation: int) -> None:
        """The next block, or new refs for a known one (its catalog was restarted: the rows are the same)."""
        for known in self.blocks:
            if (known.epoch, known.block) == (epoch, block):
                renewed = KnownBlock(self.layout.seed, self.index, epoch, block, parts, incarnation)
                if renewed.rows != known.rows:
                    raise RuntimeError(f"source {self.index} block {(epoch, block)} packed {renewed.rows} rows, "
                                       f"{known.rows} before: the stream is not deterministic")
                known.refs, known.starts, known.incarnation = renewed.refs, renewed.starts, incarnation
                return
        if (epoch, block) != self.next:
            if self.blocks and (epoch, block) < (self.blocks[0].epoch, self.blocks[0].block):
                return  # one this rank has passed
            raise RuntimeError(f"stream out of order: source {self.index} expected block {self.next}, "
                               f"got {(epoch, block)}")
        got = KnownBlock(self.layout.seed, self.index, epoch, block, parts, incarnation)
        self.blocks.append(got)
        self.starts = np.append(self.starts, self.starts[-1] + got.rows)
        if block == 0:
            self.epoch_rows = 0
        if self.epoch_rows is not None:
            self.epoch_rows += got.rows
            if block + 1 == self.layout.n_blocks[self.index] and self.epoch_rows == 0:  # it would cycle forever
                raise ValueError(self.layout.empty[self.index])
        self.next = next_block(self.layout.n_blocks[self.index], self.layout.max_epochs, epoch, block)
        self.ended = self.next is None

    def block_of(self, j) -> np.ndarray:
        """Which known block holds each of the session rows `j` (a block of no rows shares its start with the next
        one, which `side="right"` picks)."""
        return np.searchsorted(self.starts, j, side="right") - 1

    def cursor_after(self, consumed: int) -> SourceCursor:
        """The source's cursor once `consumed` of its rows from the session's start are taken: in the block of the
        last one taken, after it (the single-coordinator stream's cursors, a used-up block included)."""
        if consumed == 0:
            return self.cursor
        k = int(self.block_of(consumed - 1))
        return SourceCursor(self.blocks[k].epoch, self.blocks[k].block, consumed - int(self.starts[k]))

    def drop_before(self, j: int) -> None:
        """Forget the blocks before the one holding session row j - 1 (the cursor's block until row j is taken)."""
        behind = int(self.block_of(j - 1)) if j > 0 else 0
        if behind > 0:
            self.blocks, self.starts = self.blocks[behind:], self.starts[behind:]


@lru_cache(maxsize=16)
def schedule_of(weights: tuple[float, ...], origin: tuple[int, ...]) -> Schedule:
    """One Schedule per blend and position in a process: ranks (threads) of one process share its walked marks."""
    return Schedule(weights, origin)


@dataclass
class Routed:
    """Rank r's part of one global micro-batch: the runs its rows are in (each once), and for each row which run
    and which row of it; `position` the stream's position after the whole global micro-batch."""

    refs: list
    which: np.ndarray
    rows: np.ndarray
    position: dict


class Router:
    """Rank `rank`'s rows of each global micro-batch of a session that opened at `position`. `missing(g)` names the
    sources whose known blocks do not yet reach the end of global micro-batch g; `route(g)` then says where the
    rank's rows are, or None when a source has ended before the global micro-batch is whole (the stream's end:
    a partial global micro-batch would desync ranks)."""

    def __init__(self, layout: Layout, position: dict | None, world_size: int, micro_batch_size: int, rank: int):
        self.layout, self.world_size, self.m, self.rank = layout, world_size, micro_batch_size, rank
        cursors, counts = read_position(position, len(layout.weights))
        self.origin = np.asarray(counts, dtype=np.int64)
        self.schedule = schedule_of(layout.weights, tuple(int(c) for c in counts))
        self.sources = [SourceRows(layout, i, c) for i, c in enumerate(cursors)]

    def needs(self, g: int) -> np.ndarray:
        """Rows of each source the session takes through global micro-batch g."""
        return self.schedule.counts((g + 1) * self.world_size * self.m) - self.origin

    def missing(self, g: int) -> list[int]:
        """Sources whose known blocks fall short of global micro-batch g and that have more to come."""
        need = self.needs(g)
        return [i for i, s in enumerate(self.sources) if need[i] > s.rows() and not s.ended]

    def route(self, g: int) -> Routed | None:
        need = self.needs(g)
        for i, s in enumerate(self.sources):
            if need[i] > s.rows():
                if not s.ended:
                    raise RuntimeError(f"source {i}'s blocks for global micro-batch {g} are not known yet")
                return None
        start = g * self.world_size * self.m + self.rank * self.m
        picks = self.schedule.sources(start, start + self.m)
        before = self.schedule.counts(start) - self.origin
        refs: dict = {}
        which = np.empty(self.m, dtype=np.int64)
        rows = np.empty(self.m, dtype=np.int64)
        for i in np.unique(picks):
            mine = np.flatnonzero(picks == i)
            source = self.sources[i]
            j = before[i] + np.arange(len(mine))  # the source's session rows these are
            k = source.block_of(j)
            for b in np.unique(k):
                at, block = mine[k == b], source.blocks[b]
                packed = block.order[j[k == b] - source.starts[b]]  # the row's place in the block's packing
                run = np.searchsorted(block.starts, packed, side="right") - 1
                rows[at] = packed - block.starts[run]
                which[at] = np.array([refs.setdefault(block.refs[r], len(refs)) for r in run])
            source.drop_before(int(before[i]))
        cursors = [s.cursor_after(int(need[i])) for i, s in enumerate(self.sources)]
        return Routed(list(refs), which, rows, position_state(cursors, self.origin + need))
