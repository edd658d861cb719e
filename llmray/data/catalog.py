"""The shared part of the stream: one Ray Data pipeline tokenizes and packs the blocks, and one small actor lists them.

    work items: (source, epoch, block, run of pieces), a block's runs together, blocks in the order the blend will
    need them ─► map_batches(pack_run, tasks): each run packed by whichever tokenize worker is free; the output
    stays in Ray's object store
      ─► BlockCatalog (one actor, metadata only): each packed block's (ref, rows) of its runs, by (source, epoch,
         block). A rank asks for the blocks after those it knows and gets every listed one: O(blocks), no row.

The rows of a global micro-batch are each rank's to work out (`route.py`). The catalog is restartable: a new
incarnation starts the pipeline again from the earliest block a rank asks for (the refs the old one owned are
lost with it), and since a block's rows are a function of the seed, a rank gets the same rows under new refs.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import ray

from llmray import logs
from llmray.data.pack import StreamSpec, pack_run, tokenize_env
from llmray.data.plan import block_pieces, block_tasks
from llmray.data.route import Layout, next_block, read_position

Start = tuple[int, int] | None  # a source's (epoch, block) to start from; None: nothing to make for it


def work_items(spec: StreamSpec, starts: list[Start], horizon_rows: int | None) -> list[dict]:
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
            at, k = next_block(source.n_blocks, spec.max_epochs, *at), k + 1
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


@dataclass
class Pipeline:
    """A running Ray Data execution of work items from `starts`: the items not yet received (in order), where each
    source's last item lies, and the iterator of packed outputs (None: nothing to run)."""

    starts: list[Start]
    items: deque
    last_item: dict[int, tuple[int, int]]  # source -> (epoch, block) of its last item
    outputs: Iterator | None
    assembling: dict = field(default_factory=dict)  # source -> (ref, rows) of its next block's runs so far


@dataclass
class Session:
    """A worker group's reading of the stream: the packed blocks listed, and each rank's earliest block still read."""

    id: str
    world_size: int
    blocks: dict = field(default_factory=dict)  # (source, epoch, block) -> [(ref, rows) of each run]
    oldest: dict = field(default_factory=dict)  # rank -> per source, the earliest (epoch, block) it may still read
    reports: int = 0  # requests since blocks were last dropped


class BlockCatalog:
    """Lists the packed blocks; the pipeline runs only as far as ranks ask (and Ray Data's read-ahead).

    A worker group has a session id (all its ranks pass the same); a new session (a restarted or resized group)
    drops what was listed and restarts the pipeline where its ranks ask. Started with max_restarts: lost, it comes
    back empty, and its first requests restart the pipeline (`blocks`).
    """

    def __init__(self, spec: StreamSpec, horizon_rows: int | None = None, expected_start: dict | None = None):
        """`expected_start`: the position the first worker group will most likely open (a run's resume point, or
        {} for its beginning): the pipeline starts there at once, so tokenizing overlaps the workers' start-up."""
        logs.quiet_here()
        self.spec, self.horizon = spec, horizon_rows
        self.incarnation = time.time_ns()  # the refs it lists are owned by this process; a restart's is later
        self.session: Session | None = None
        self.pipeline: Pipeline | None = None
        self.early: Pipeline | None = None  # begun before any session, used by one that starts there
        self.calls, self.busy_s, self.waiting_s = 0, 0.0, 0.0
        if expected_start is not None:
            cursors, _ = read_position(expected_start, len(spec.sources))
            self.early = self._start([(c.epoch, c.block) for c in cursors])

    def layout(self) -> Layout:
        return Layout.of(self.spec)

    def blocks(self, session: str, world_size: int, rank: int, oldest: list[tuple[int, int]], wanted: list[Start],
               wait: list[int]) -> dict:
        """The listed blocks of each source from its `wanted` (epoch, block) on, consecutive; for each source with
        `wait` > 0, after pulling the pipeline until that many blocks from its wanted one are listed (or the source
        has no more): a rank reading ahead gets several blocks a request. `oldest`: the earliest block of each
        source the rank may still read: blocks every rank has passed are dropped, and a pipeline (re)started for
        this request starts there. {"incarnation", "blocks": per source [(epoch, block, parts), ...]}."""
        started = time.perf_counter()
        self.calls += 1
        if self.session is None or self.session.id != session:
            self._open(session, world_size, oldest)
            self.waiting_s += time.perf_counter() - started  # the pipeline's start, not serving
        self.session.oldest[rank] = [tuple(o) for o in oldest]
        self._drop_passed()
        need = [tuple(o) for o in oldest]
        starts = self.pipeline.starts
        if any(starts[i] is not None and need[i] < tuple(starts[i]) and (i, *need[i]) not in self.session.blocks
               for i in range(len(need))):
            # a rank still reads blocks from before the pipeline's start (this catalog was restarted mid-session)
            self.pipeline = None
            restarted = time.perf_counter()
            self.pipeline = self._start([need[i] if s is None else min(need[i], tuple(s)) for i, s in enumerate(starts)])
            self.waiting_s += time.perf_counter() - restarted
        for i, w in enumerate(wanted):
            for _ in range(wait[i]):
                while w is not None and (i, *w) not in self.session.blocks and self._pull():
                    pass
                w = None if w is None else next_block(self.spec.sources[i].n_blocks, self.spec.max_epochs, *w)
        out = []
        for i, w in enumerate(wanted):
            mine = []
            while w is not None and (i, *w) in self.session.blocks:
                mine.append((*w, self.session.blocks[(i, *w)]))
                w = next_block(self.spec.sources[i].n_blocks, self.spec.max_epochs, *w)
            out.append(mine)
        self.busy_s += time.perf_counter() - started
        return {"incarnation": self.incarnation, "blocks": out}

    def _open(self, session: str, world_size: int, starts: list[tuple[int, int]]) -> None:
        self.session = Session(session, world_size)
        starts = [tuple(s) for s in starts]
        early, self.early = self.early, None  # used once: a later session restarts from its own position
        self.pipeline = None  # dropping an iterator stops its execution, before another one starts
        self.pipeline = early if early is not None and early.starts == starts else self._start(starts)

    def _start(self, starts: list[Start]) -> Pipeline:
        items = deque(work_items(self.spec, starts, self.horizon))
        last_item = {item["source"]: (item["epoch"], item["block"]) for item in items}
        return Pipeline(list(starts), items, last_item,
                        build_dataset(self.spec, list(items)).iter_internal_ref_bundles() if items else None)

    def _drop_passed(self) -> None:
        """Forget blocks every rank of the session has passed: their rows are in the ranks' caches or done with."""
        session = self.session
        session.reports += 1
        if len(session.oldest) < session.world_size or session.reports < session.world_size:
            return  # recomputed once per world_size requests: O(1) a request
        session.reports = 0
        floor = [min(o[i] for o in session.oldest.values()) for i in range(len(self.spec.sources))]
        for key in [k for k in session.blocks if k[1:] < floor[k[0]]]:
            del session.blocks[key]

    def _pull(self) -> bool:
        started = time.perf_counter()
        try:
            return self._pull_block()
        finally:
            self.waiting_s += time.perf_counter() - started

    def _pull_block(self) -> bool:
        """One more produced item listed (a block once all its runs are); False when the pipeline has no more."""
        while True:
            pipeline = self.pipeline
            try:
                bundle = next(pipeline.outputs) if pipeline.outputs is not None else None
            except StopIteration:
                bundle = None
            if bundle is None:
                sources = self.spec.sources
                continuing = [next_block(sources[i].n_blocks, self.spec.max_epochs, *pipeline.last_item[i])
                              if i in pipeline.last_item else None for i in range(len(sources))]
                if pipeline.outputs is None or not any(c is not None for c in continuing):
                    return False
                self.pipeline = None
                self.pipeline = self._start(continuing)  # past the horizon: the next stretch, from its end
                continue
            for entry in bundle.blocks:  # one output block per item, in item order
                item = pipeline.items.popleft()
                i = item["source"]
                parts = pipeline.assembling.setdefault(i, [])
                parts.append((entry.ref, entry.metadata.num_rows))
                if len(parts) == item["tasks"]:  # the block is whole
                    self.session.blocks.setdefault((i, item["epoch"], item["block"]), parts)
                    pipeline.assembling[i] = []
            return True

    def stats(self) -> dict:
        """For benchmarks: requests served, and seconds spent serving them (waiting for the pipeline excluded)."""
        return {"calls": self.calls, "serve_s": self.busy_s - self.waiting_s, "waiting_s": self.waiting_s}


CatalogActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(BlockCatalog)  # lost: restarted,
# and the calls in flight retried on the new incarnation
