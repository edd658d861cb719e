"""CUDA graphs for the serving engine's decode step: one per shape, captured the first time the shape is seen.

A decode step of a small model is a few hundred small kernels whose launches, not their work, bound it on a GPU.
A graph replays the whole step as one launch. Its inputs are copied into fixed buffers and its logits written to
a fixed buffer (one per batch size, shared by that size's graphs), and everything else it touches must stay where
it was at capture: the KV cache is written in place (`slots.py`), and a reallocated cache drops every graph. The
least recently used graphs go beyond `MAX_GRAPHS`. If a capture fails (an op the model runs cannot be captured,
e.g. a RoPE that compares a position on the host) the engine says so once and decodes eagerly from then on.
Without CUDA the same buffers are run through the step directly: the plumbing tests see, without a capture.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

MAX_GRAPHS = 128  # captured decode shapes kept; each holds its activations' memory in the shared pool

# (ids [rows, 1], positions [rows, 1], positions attended) -> logits [rows, vocab]
Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class _Graph:
    ids: torch.Tensor
    positions: torch.Tensor
    graph: "torch.cuda.CUDAGraph | None" = None  # None without CUDA: the step runs on the buffers directly


class DecodeGraphs:
    def __init__(self, step: Step, device: torch.device):
        self.step, self.device, self.capture = step, device, device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None  # the graphs share their memory
        self.graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self.logits: dict[int, torch.Tensor] = {}  # rows -> the output buffer of that batch size's graphs
        self.allocation = 0  # the cache allocation the graphs were captured on
        self.failed: str | None = None

    def __len__(self) -> int:
        return len(self.graphs)

    @property
    def on(self) -> bool:
        return self.failed is None

    def run(self, ids: torch.Tensor, positions: torch.Tensor, span: int, allocation: int) -> torch.Tensor:
        """The step's logits for these inputs, through the graph of their shape (made now if new). `allocation`:
        the cache's reallocation count; when it moves, every graph reads buffers that are gone and is dropped.
        With CUDA the result is the graphs' output buffer: read it before the next run."""
        if self.failed:
            return self.step(ids, positions, span)
        if allocation != self.allocation:
            self.graphs.clear()
            self.logits.clear()
            self.allocation = allocation
        shape = (ids.shape[0], span)
        with torch.cuda.device(self.device) if self.capture else nullcontext():
            found = self.graphs.get(shape)
            if found is None:
                try:
                    found = self._record(ids, positions, span)
                except Exception as e:  # noqa: BLE001 - a model that cannot be captured still serves, eagerly
                    cause = e.__context__ or e  # a failed capture_end hides what broke the capture
                    self.failed = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                    print(f"[llmray] serve: CUDA graphs off, the decode step could not be captured ({self.failed})",
                          flush=True)
                    return self.step(ids, positions, span)
                self.graphs[shape] = found
                if len(self.graphs) > MAX_GRAPHS:
                    self.graphs.popitem(last=False)
            else:
                self.graphs.move_to_end(shape)
                found.ids.copy_(ids)
                found.positions.copy_(positions)
            if found.graph is None:
                return self.step(found.ids, found.positions, span)
            found.graph.replay()
            return self.logits[shape[0]]

    def _record(self, ids: torch.Tensor, positions: torch.Tensor, span: int) -> _Graph:
        ids, positions = ids.clone(), positions.clone()
        if not self.capture:
            return _Graph(ids, positions)
        # Warm up on a side stream (lazy initialisations, library workspaces), as PyTorch's capture recipe asks.
        # It writes the same keys and values at the same positions as the replay will: no harm done.
        caller = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            warm = self.step(ids, positions, span)
        caller.wait_stream(side)
        out = self.logits.get(ids.shape[0])
        if out is None:  # made outside the capture, so no graph's pool memory stays held by an output
            out = self.logits[ids.shape[0]] = torch.empty_like(warm)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out.copy_(self.step(ids, positions, span))
        except Exception:
            torch.cuda.set_stream(caller)  # a failed capture leaves its own stream current
            torch.cuda.synchronize()
            raise
        return _Graph(ids, positions, graph)
