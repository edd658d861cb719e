"""The token stream: Ray Data tokenizes and packs blocks of the whole corpus; each Train worker fetches its rows.

    plan (plan.py)     every source's pieces, per epoch a seeded permutation cut into blocks; the blend's schedule
      ─► one Ray Dataset for the run: a (source, epoch, block, run of pieces) item per task, block after block
         ─► map_batches(pack_run, tasks): each run packed by whichever tokenize worker is free
         its output stays in Ray's object store; no per-epoch rebuild, no sample passes through an actor
      ─► StreamCoordinator (one actor, metadata only): once a block's pieces are packed, shuffles the block's rows
         by their counts alone, cuts the blended row sequence into global micro-batches and tells rank r which
         rows of which stored pieces are its rows [r*m, (r+1)*m) of each
      ─► RankStream on each worker: fetches those blocks straight from the object store, gathers its rows;
         its state_dict() is the position a checkpoint stores

Why not `streaming_split`: it hands blocks to whichever worker asks first, so which sample lands on which rank, and
in what order, changes from run to run (ray #58658). Here the global order is a function of the seed alone: the
same global batch reaches 1 worker or 8, and a run resumes at an exact position on any world size, re-tokenizing
at most one block per source.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import ray

from llmray import logs
from llmray.data.pack import StreamSpec, pack_run, tokenize_env
from llmray.data.plan import BLOCK_PIECES, PIECE_SAMPLES, Blend, block_pieces, block_row_order, block_tasks

RANK_CACHE_ROWS = 4 * BLOCK_PIECES * PIECE_SAMPLES  # packed rows a rank keeps fetched: about its last few blocks


@dataclass
class SourceCursor:
    """Where one source stands: the next row is row `offset` of block `block` of its epoch `epoch`."""

    epoch: int = 0
    block: int = 0
    offset: int = 0


def position_state(cursors: list[SourceCursor], counts: list[int]) -> dict:
    """The stream's position as a checkpoint stores it (independent of the world size)."""
    return {"sources": [vars(c).copy() for c in cursors], "counts": [int(c) for c in counts]}


def read_position(state: dict | None, n_sources: int) -> tuple[list[SourceCursor], list[int]]:
    if not state:
        return [SourceCursor() for _ in range(n_sources)], [0] * n_sources
    if "sources" not in state or len(state["sources"]) != n_sources:
        raise ValueError(f"stream position {state} does not fit a stream of {n_sources} sources")
    return [SourceCursor(**c) for c in state["sources"]], list(state["counts"])


def next_block(spec: StreamSpec, index: int, epoch: int, block: int) -> tuple[int, int] | None:
    """The block after (epoch, block) of source `index`; None when the source may not start another epoch."""
    if block + 1 < spec.sources[index].n_blocks:
        return epoch, block + 1
    if spec.max_epochs is not None and epoch + 1 >= spec.max_epochs:
        return None
    return epoch + 1, 0


def work_items(spec: StreamSpec, starts: list[tuple[int, int] | None], horizon_rows: int | None) -> list[dict]:
    """(source, epoch, block, run of pieces) items, a block's runs together, from each source's start, blocks ordered by
    when the blend will need them (a source of weight w uses a block every rows_per_block / w global rows), up to
    the horizon (with room to spare: the rows a block yields are estimated) or the sources' last epoch."""
    keyed = []
    for index, (source, start) in enumerate(zip(spec.sources, starts)):
        if start is None:  # this source has ended
            continue
        rows_per_block = source.rows_per_block
        wanted = None if horizon_rows is None else 2 * math.ceil(horizon_rows * source.weight / rows_per_block) + 2
        at, k = start, 0
        while at is not None and (wanted is None or k < wanted):
            keyed.append((k * rows_per_block / source.weight, index, at))
            at, k = next_block(spec, index, *at), k + 1
            if wanted is None and k >= 4 * source.n_blocks:  # endless and no horizon: a few epochs at a time
                break
    keyed.sort(key=lambda x: (x[0], x[1]))
    items = []
    for _, i, (e, b) in keyed:
        tasks = block_tasks(len(block_pieces(spec.sources[i], i, spec.seed, e, b)))
        items += [{"source": i, "epoch": e, "block": b, "first": first, "count": count, "tasks": len(tasks)}
                  for first, count in tasks]
    return items


def build_dataset(spec: StreamSpec, items: list[dict]) -> "ray.data.Dataset":
    """The runs of pieces of `items`, tokenized and packed by up to `spec.tasks` tasks at a time, in item order.
    Tasks, not an actor pool: each worker process keeps its tokenizer between tasks all the same, and a task lost
    with its process is retried by Ray Data. (An actor's constructor arguments would sit in the object store, which
    Ray warns of for every restartable actor.)"""
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(pack_run, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=min(spec.tasks, len(items))),
                        num_cpus=spec.cpus_per_task,
                        runtime_env={"env_vars": tokenize_env(spec)})
    ds.context.execution_options.preserve_order = True
    return ds


class Block:
    """A block whose runs of pieces are packed (in the object store): its rows in the block's seeded order, by
    reference. `parts`: (ref, rows) of each run, in block order."""

    def __init__(self, seed: int, index: int, epoch: int, block: int, parts: list[tuple]):
        self.epoch, self.block = epoch, block
        self.refs = [ref for ref, _ in parts]
        self.starts = np.cumsum([0] + [rows for _, rows in parts])
        self.rows = int(self.starts[-1])
        self.order = block_row_order(seed, index, epoch, block, self.rows)  # as pack.Packer.block orders them

    def row(self, j: int) -> tuple:
        """(ref of the run holding the block's row j, row within that run)."""
        k = int(self.order[j])
        run = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.refs[run], k - int(self.starts[run])


@dataclass
class Pipeline:
    """A running Ray Data execution of work items: the items not yet received (in order), where each source's
    last item lies, and the iterator of packed outputs (None: nothing to run)."""

    items: deque
    last_item: dict[int, tuple[int, int]]  # source -> (epoch, block) of its last item
    outputs: Iterator | None


@dataclass
class Session:
    """A worker group's reading of the stream, from the position it opened at: each source's cursor and its blocks
    in flight, the blend's schedule, and each rank's queue of micro-batches cut and not yet taken."""

    id: str
    world_size: int
    micro_batch_size: int  # rows per rank in each global micro-batch
    cursors: list[SourceCursor]
    blend: Blend
    ready: list[deque]  # per source: Blocks whose runs are all packed
    assembling: list[list]  # per source: (ref, rows) of its next block's runs
    current: list[Block | None]  # per source: the block rows are being taken from
    # per source: rows its current epoch has yielded so far (None: the group joined it midway, not counted)
    epoch_rows: list[int | None]
    queues: list[deque]  # per rank
    done: bool = False


@ray.remote(num_cpus=0)
class StreamCoordinator:
    """Cuts the blended row sequence into global micro-batches of `world_size * micro_batch_size` rows and tells
    each rank where its rows are; the rows themselves stay in the object store until the rank fetches them.

    A worker group opens a session with the position it resumes from (all its ranks pass the same session id); a
    new session (a restarted or resized group) drops what was read ahead and restarts the pipeline there.
    """

    def __init__(self, spec: StreamSpec, horizon_rows: int | None = None, expected_start: dict | None = None):
        """`expected_start`: the position the first worker group will most likely open (a run's resume point, or
        {} for its beginning): the pipeline starts there at once, so tokenizing overlaps the workers' start-up."""
        logs.quiet_here()
        self.spec, self.horizon = spec, horizon_rows
        self.session: Session | None = None
        self.pipeline: Pipeline | None = None
        # begun before any session: (each source's (epoch, block) start, its pipeline), used by a session opening there
        self.early: tuple[list, Pipeline] | None = None
        self.busy_s = self.waiting_s = 0.0  # time in next(), and the part of it spent waiting for the pipeline
        self.rows_routed = 0
        if expected_start is not None:
            cursors, _ = read_position(expected_start, len(spec.sources))
            starts = [(c.epoch, c.block) for c in cursors]
            self.early = (starts, self._start_pipeline(starts))

    def open(self, session: str, position: dict | None, world_size: int, micro_batch_size: int) -> None:
        if self.session is not None and session == self.session.id:
            return
        n = len(self.spec.sources)
        cursors, counts = read_position(position, n)
        self.session = Session(session, world_size, micro_batch_size, cursors, Blend(self.spec.weights, counts),
                               ready=[deque() for _ in range(n)], assembling=[[] for _ in range(n)],
                               current=[None] * n,
                               epoch_rows=[0 if (c.block, c.offset) == (0, 0) else None for c in cursors],
                               queues=[deque() for _ in range(world_size)])
        starts = [(c.epoch, c.block) for c in cursors]
        early, self.early = self.early, None  # used once: a later session restarts from its own position
        self.pipeline = None  # dropping an iterator stops its execution, before another one starts
        if early is not None and early[0] == starts:
            self.pipeline = early[1]
        else:
            early = None
            self.pipeline = self._start_pipeline(starts)

    def _start_pipeline(self, starts: list[tuple[int, int] | None]) -> Pipeline:
        items = deque(work_items(self.spec, starts, self.horizon))
        last_item = {item["source"]: (item["epoch"], item["block"]) for item in items}
        return Pipeline(items, last_item, build_dataset(self.spec, list(items)).iter_internal_ref_bundles()
                        if items else None)

    def _pull(self) -> bool:
        started = time.perf_counter()
        try:
            return self._pull_block()
        finally:
            self.waiting_s += time.perf_counter() - started

    def _pull_block(self) -> bool:
        """One more produced block into its source's queue; False when the pipeline has no more."""
        session = self.session
        while True:
            pipeline = self.pipeline
            try:
                bundle = next(pipeline.outputs) if pipeline.outputs is not None else None
            except StopIteration:
                bundle = None
            if bundle is None:
                continuing = [next_block(self.spec, i, *pipeline.last_item[i]) if i in pipeline.last_item else None
                              for i in range(len(self.spec.sources))]
                if pipeline.outputs is None or not any(c is not None for c in continuing):
                    return False
                self.pipeline = None
                self.pipeline = self._start_pipeline(continuing)  # past the horizon: the next stretch, from its end
                continue
            for entry in bundle.blocks:  # one output block per item, in item order
                item = pipeline.items.popleft()
                i, parts = item["source"], session.assembling[item["source"]]
                parts.append((entry.ref, entry.metadata.num_rows))
                if len(parts) == item["tasks"]:  # the block is whole: its rows can be ordered
                    session.ready[i].append(Block(self.spec.seed, i, item["epoch"], item["block"], parts))
                    session.assembling[i] = []
            return True

    def _row_of(self, index: int) -> tuple | None:
        """(ref, row) of source `index`'s next row, advancing its cursor; None when the source has ended."""
        session = self.session
        cursor = session.cursors[index]
        while True:
            cur = session.current[index]
            here = cur is not None and (cur.epoch, cur.block) == (cursor.epoch, cursor.block)
            if here and cursor.offset < cur.rows:
                cursor.offset += 1
                return cur.row(cursor.offset - 1)
            if here:  # this block is used up
                source = self.spec.sources[index]
                if cursor.block + 1 == source.n_blocks and session.epoch_rows[index] == 0:  # it would cycle forever
                    raise ValueError(f"source {source.name!r}: its documents ({source.documents.part} of "
                                     f"{source.documents.location}) yield no {self.spec.seq_len}-token sample")
                following = next_block(self.spec, index, cursor.epoch, cursor.block)
                if following is None:
                    return None
                if following[0] != cursor.epoch:
                    session.epoch_rows[index] = 0
                cursor.epoch, cursor.block, cursor.offset = *following, 0
            while not session.ready[index]:
                if not self._pull():
                    return None
            session.current[index] = got = session.ready[index].popleft()
            if session.epoch_rows[index] is not None:
                session.epoch_rows[index] += got.rows
            if (got.epoch, got.block) != (cursor.epoch, cursor.block):
                raise RuntimeError(f"stream out of order: source {index} expected block {(cursor.epoch, cursor.block)},"
                                   f" got {(got.epoch, got.block)}")

    def _fill(self) -> None:
        session = self.session
        if session.done:
            for q in session.queues:
                q.append(None)
            return
        rows, m = [], session.micro_batch_size
        for _ in range(session.world_size * m):
            found = self._row_of(session.blend.next())
            if found is None:  # a source ended (max_epochs): a partial global batch would desync ranks
                session.done = True
                for q in session.queues:
                    q.append(None)
                return
            rows.append(found)
        self.rows_routed += len(rows)
        position = position_state(session.cursors, session.blend.counts)
        for r, q in enumerate(session.queues):
            refs: OrderedDict = OrderedDict()  # the runs this rank's rows are in, each once
            which, where = [], []
            for ref, row in rows[r * m:(r + 1) * m]:
                which.append(refs.setdefault(ref.hex(), (len(refs), ref))[0])
                where.append(row)
            q.append({"refs": [ref for _, ref in refs.values()], "which": np.array(which), "rows": np.array(where),
                      "position": position})

    def next(self, session: str, rank: int, count: int) -> list[dict | None]:
        """Rank `rank`'s next `count` micro-batches (where their rows are); None marks the end of the stream."""
        if self.session is None or session != self.session.id:
            raise RuntimeError(f"stream session {session} was replaced by {self.session and self.session.id}")
        started = time.perf_counter()
        queue, out = self.session.queues[rank], []
        while len(out) < count:
            if not queue:
                self._fill()
            item = queue.popleft()
            out.append(item)
            if item is None:
                break
        self.busy_s += time.perf_counter() - started
        return out

    def stats(self) -> dict:
        """For benchmarks: rows routed, and seconds spent routing them (waiting for the pipeline excluded)."""
        return {"rows": self.rows_routed, "route_s": self.busy_s - self.waiting_s, "waiting_s": self.waiting_s}


class RankStream:
    """A worker's view of the stream: an iterator of its micro-batches, prefetched, and the stream's position.

    Stateful in torchtitan's sense: `state_dict()` is the position after the last micro-batch this rank took (the
    same on every rank after a step), what a checkpoint stores; `load_state_dict()` before the first batch starts
    the stream there. The first `next()` opens this worker group's session on the coordinator.
    """

    def __init__(self, coordinator, session: str, rank: int, world_size: int, micro_batch_size: int, prefetch: int):
        self.coord, self.session, self.rank = coordinator, session, rank
        self.world_size, self.micro_batch_size, self.prefetch = world_size, micro_batch_size, prefetch
        self.position: dict = {}  # {}: the beginning
        self.pending: deque | None = None  # None: the session is not open yet
        self.request = None
        self.runs: OrderedDict = OrderedDict()  # fetched packed runs of pieces, most recent last
        self.cached_rows = 0

    def state_dict(self) -> dict:
        return self.position

    def load_state_dict(self, state: dict) -> None:
        if self.pending is not None:
            raise RuntimeError("a stream's position can only be set before its first batch")
        self.position = state or {}

    def __iter__(self) -> Iterator[dict]:
        return self

    def _fetch(self, refs: list) -> list[dict[str, np.ndarray]]:
        """The packed runs behind `refs`: those not cached fetched in one call to the object store."""
        from ray.data.block import BlockAccessor

        missing = [ref for ref in refs if ref.hex() not in self.runs]
        for ref, table in zip(missing, ray.get(missing)):
            columns = BlockAccessor.for_block(table).to_numpy()
            self.runs[ref.hex()] = {c: np.asarray(v) for c, v in columns.items()}
            self.cached_rows += len(self.runs[ref.hex()]["sample"])
        for ref in refs:
            self.runs.move_to_end(ref.hex())
        while self.cached_rows > RANK_CACHE_ROWS and len(self.runs) > len(refs):  # oldest first, never these
            _, dropped = self.runs.popitem(last=False)
            self.cached_rows -= len(dropped["sample"])
        return [self.runs[ref.hex()] for ref in refs]

    def __next__(self) -> dict:
        if self.pending is None:
            ray.get(self.coord.open.remote(self.session, self.position, self.world_size, self.micro_batch_size))
            self.pending = deque()
        if not self.pending:
            reply = self.request if self.request is not None else self.coord.next.remote(
                self.session, self.rank, self.prefetch)
            self.pending.extend(ray.get(reply))
            self.request = None
        if self.request is None and self.pending[-1] is not None:  # ask for the next ones while these train
            self.request = self.coord.next.remote(self.session, self.rank, self.prefetch)
        item = self.pending.popleft()
        if item is None:
            self.pending.appendleft(None)
            raise StopIteration
        runs = self._fetch(item["refs"])
        which, rows = item["which"], item["rows"]
        batch = {}
        for c in runs[0]:
            first = runs[0][c]
            # a text column (an RL prompt's fields) as objects: each run's strings have their own width
            out = np.empty((len(rows), *first.shape[1:]), dtype=object if first.dtype.kind in "OU" else first.dtype)
            for p, run in enumerate(runs):  # each run's rows in one gather
                mine = which == p
                out[mine] = run[c][rows[mine]]
            batch[c] = out
        self.position = item["position"]
        return batch
