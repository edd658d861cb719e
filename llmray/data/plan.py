"""The order of the stream, as a function of the seed alone: pieces, blocks, epochs and the blend of sources.

    source ─► pieces   runs of consecutive documents of one shard, ~PIECE_SAMPLES samples of text each, read from
                       Parquet metadata (no text is read to plan)
           ─► epoch e  a seeded permutation of all the source's pieces, cut into blocks of BLOCK_PIECES pieces
           ─► block    its pieces tokenized and packed (each piece on its own), then its rows shuffled, seeded
    sources ─► blend   global row n comes from the source whose weight is furthest ahead of its share so far
                       (a deterministic low-discrepancy schedule): any window of rows holds each source within a
                       row or two of its weight

Why this shape: every global batch is drawn from BLOCK_PIECES places spread over the whole corpus (not from one
shard), no pre-tokenization pass or sample index is needed (the stream still tokenizes on the fly), and a resume
re-tokenizes one block per source, not a shard. See docs/training.md for the alternatives weighed.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from llmray.data.corpus import CorpusError, Shard, list_shards
from llmray.data.split import Documents

PIECE_SAMPLES = 64  # samples of text a piece aims for: its packing drops under one sample at its end (~1%)
BYTES_PER_TOKEN = 4  # to size pieces from bytes before anything is tokenized; a rough guess is enough
BLOCK_PIECES = 128  # pieces shuffled together: the places in the corpus one stretch of global batches draws from
IMAGE_PIECE_ROWS = 4  # image conversations a piece holds: one row each, unpacked, whose pixels (~0.6-1.4 MB in
# fp32) and base64 image (not text) make the byte sizing wrong both ways: a 224 px JPEG is about a piece's text bytes,
# so a task packed 16 images and paid its fixed cost per 16; a 32 px PNG is 1% of them, so a block would hold ~10^5
TASK_PIECES = 16  # pieces of a block one tokenize task packs: a Ray Data task's fixed cost is paid per task, so
# one per piece cost ~30% of tokenizing throughput; a block still spreads over BLOCK_PIECES / TASK_PIECES tasks


def plan_pieces(shards: list[Shard], seq_len: int, rows_per_piece: int | None = None) -> np.ndarray:
    """(n, 3) int64 rows of (shard index, first row, end row): each shard's documents cut into runs of about
    PIECE_SAMPLES samples of text, or of `rows_per_piece` documents (a source whose documents are a row each). A
    piece never spans two shards; consecutive small row groups are joined into one, and a row group larger than a
    piece is cut by row count (a piece then reads its whole row group)."""
    target = rows_per_piece or PIECE_SAMPLES * seq_len * BYTES_PER_TOKEN
    pieces = []
    for index, shard in enumerate(shards):
        groups = shard.row_groups or ((shard.rows, 0),)
        if rows_per_piece:  # sized by documents, not bytes
            groups = tuple((rows, rows) for rows, _ in groups)
        row = 0
        pending_start, pending_bytes = 0, 0
        for rows, size in groups:
            cuts = max(1, round(size / target)) if size else 1
            if cuts == 1 and pending_bytes + size < target:  # a small row group joins its neighbours
                pending_bytes += size
                row += rows
                continue
            if pending_bytes:
                pieces.append((index, pending_start, row))
            edges = np.linspace(row, row + rows, min(cuts, rows) + 1).round().astype(int)
            pieces += [(index, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
            row += rows
            pending_start, pending_bytes = row, 0
        if row > pending_start:
            pieces.append((index, pending_start, row))
    return np.array(pieces, dtype=np.int64).reshape(-1, 3)


@dataclass(frozen=True)
class Source:
    """One part of the blend, planned: its documents, shards, weight and pieces."""

    name: str
    weight: float  # normalised: the sources' weights sum to 1
    documents: Documents
    shards: tuple[str, ...]
    pieces: np.ndarray = field(repr=False)  # from plan_pieces
    first_piece: int = 0  # the global id of its first piece: piece ids are unique across sources
    rows_estimate: float = 0.0  # samples an epoch yields, guessed from its text bytes (0: PIECE_SAMPLES a piece)

    @property
    def n_blocks(self) -> int:
        return math.ceil(len(self.pieces) / BLOCK_PIECES)

    @property
    def rows_per_block(self) -> float:
        """About how many samples a block yields: what the stream plans how far ahead to tokenize from (a small
        corpus's pieces hold far fewer than PIECE_SAMPLES)."""
        total = self.rows_estimate or PIECE_SAMPLES * len(self.pieces)
        return max(1.0, total / max(self.n_blocks, 1))


def block_pieces(source: Source, index: int, seed: int, epoch: int, block: int) -> np.ndarray:
    """The piece indices (into source.pieces) of block `block` of epoch `epoch`; `index`: the source's place in
    the blend, so two sources with the same shards still draw different orders."""
    return epoch_order(len(source.pieces), seed, index, epoch)[block * BLOCK_PIECES:(block + 1) * BLOCK_PIECES]


@lru_cache(maxsize=8)
def epoch_order(n_pieces: int, seed: int, index: int, epoch: int) -> np.ndarray:
    """The permutation of a source's pieces for one epoch. Cached: a planner walking an epoch's blocks would
    otherwise draw it once per block, n_blocks times the cost of one permutation of all pieces."""
    order = np.random.default_rng([seed, index, epoch]).permutation(n_pieces)
    order.flags.writeable = False  # shared by every caller
    return order


def block_tasks(n_pieces: int) -> list[tuple[int, int]]:
    """(first, count) of each tokenize task's run of a block's `n_pieces` pieces, in block order."""
    return [(k, min(TASK_PIECES, n_pieces - k)) for k in range(0, n_pieces, TASK_PIECES)]


def block_row_order(seed: int, index: int, epoch: int, block: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, index, epoch, block, 1]).permutation(n)


class Blend:
    """Which source each global row comes from: the one whose weighted share is furthest ahead of what it has
    given so far (ties to the first). `counts` is the whole state, so a resumed stream continues the schedule.
    The definition, row by row; `Schedule` gives the same picks and counts without walking every row."""

    def __init__(self, weights: list[float], counts: list[int] | None = None):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.counts = np.array(counts if counts is not None else [0] * len(weights), dtype=np.int64)

    def next(self) -> int:
        n = self.counts.sum() + 1
        s = int(np.argmax(self.weights * n - self.counts))
        self.counts[s] += 1
        return s


SCHEDULE_MARKS = 1024  # counts a walked Schedule keeps (three or more sources): where its latest walks stopped


class Schedule:
    """`Blend` from a position (its counts, the `origin`): the source of any later row, and the counts after any
    number of rows, each as a jump rather than a walk where a closed form holds.

    One source: every row. Two sources of weights w, 1 - w: the greedy rule picks the first at row n (1-based) iff
    w·n − c ≥ (1 − w)·n − (n − 1 − c), i.e. c ≤ w·n − 1/2, so from counts (0, 0) its count after n rows is
    floor(w·n + 1/2) (rounding, as Sainte-Laguë apportions). Each jump is checked against the rule's own float test
    over the rows it covers, and an origin off that path (another blend's counts) walks instead. Three or more
    sources have no such form (the rule is then a piecewise rotation of the deficits): it is walked from the nearest
    counts kept where earlier walks stopped, so a rank walks about the rows since its last global micro-batch."""

    def __init__(self, weights: tuple[float, ...], origin: tuple[int, ...]):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.int64)
        self.n0 = int(self.origin.sum())
        self.closed = len(weights) == 1 or (len(weights) == 2 and int(self._rounded(np.array([self.n0]))[0])
                                            == self.origin[0])
        self.marks = OrderedDict({0: self.origin.copy()})  # walked: rows from the origin -> counts after, by use
        self.at = [0]  # the marks' rows, sorted

    def _rounded(self, n: np.ndarray) -> np.ndarray:
        """The first source's count after n rows from (0, 0) (two sources), vectorised."""
        return np.floor(self.weights[0] * n + 0.5).astype(np.int64)

    def counts(self, rows: int) -> np.ndarray:
        """Each source's count after `rows` rows from the origin."""
        if self.closed:
            n = self.n0 + rows
            if len(self.weights) == 1:
                return np.array([n], dtype=np.int64)
            c = int(self._rounded(np.array([n]))[0])
            return np.array([c, n - c], dtype=np.int64)
        return self._walk(rows, rows)[0]

    def sources(self, start: int, stop: int) -> np.ndarray:
        """The source of each row in [start, stop) counted from the origin."""
        if not self.closed:
            return self._walk(start, stop)[1]
        if len(self.weights) == 1:
            return np.zeros(stop - start, dtype=np.int64)
        n = np.arange(self.n0 + start, self.n0 + stop + 1)  # rows before each row, and after the last
        c = self._rounded(n)
        picks = np.where(np.diff(c) == 1, 0, 1)
        # the rule's own float test at each row, from the counts before it
        step, before = n[1:], c[:-1]
        rule = np.where(self.weights[0] * step - before >= self.weights[1] * step - (step - 1 - before), 0, 1)
        if not (np.array_equal(picks, rule) and np.isin(np.diff(c), (0, 1)).all()):
            self.closed = False  # a float edge: walk instead (never seen)
            return self._walk(start, stop)[1]
        return picks

    def _walk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(counts after `stop` rows, sources of rows [start, stop)), walked from the latest mark at or before
        `start`."""
        at = self.at[bisect.bisect_right(self.at, start) - 1]
        self.marks.move_to_end(at)
        counts, w = [int(c) for c in self.marks[at]], [float(x) for x in self.weights]
        total, k = self.n0 + at, len(w)
        picks = []
        for row in range(at, stop):
            total += 1
            best, s = w[0] * total - counts[0], 0
            for j in range(1, k):
                d = w[j] * total - counts[j]
                if d > best:
                    best, s = d, j
            counts[s] += 1
            if row >= start:
                picks.append(s)
        done = np.array(counts, dtype=np.int64)
        if stop not in self.marks:
            self.marks[stop] = done
            bisect.insort(self.at, stop)
            if len(self.at) > SCHEDULE_MARKS:  # the least recently used, but the origin
                old = next(k for k in self.marks if k)
                del self.marks[old]
                self.at.remove(old)
        return done, np.array(picks, dtype=np.int64)


def plan_sources(parts: list[tuple[str, float, Documents]], seq_len: int, rows_per_piece: int | None = None
                 ) -> tuple[Source, ...]:
    """(name, weight, documents) of each source into planned Sources, weights normalised to sum to 1; pieces of
    `rows_per_piece` documents where each document is a row (image conversations), else of text bytes."""
    total = sum(w for _, w, _ in parts)
    out, first = [], 0
    for name, weight, documents in parts:
        try:
            shards = list_shards(documents.location)
        except CorpusError as e:
            raise CorpusError(f"source {name!r}: {e}" if len(parts) > 1 else str(e)) from None
        pieces = plan_pieces(shards, seq_len, rows_per_piece)
        if rows_per_piece:
            rows = sum(s.rows for s in shards)
        else:
            rows = sum(size for s in shards for _, size in s.row_groups) / (seq_len * BYTES_PER_TOKEN)
        out.append(Source(name, weight / total, documents, tuple(s.path for s in shards), pieces, first, rows))
        first += len(pieces)
    return tuple(out)
