"""CUDA graphs for the serving engine's decode step: one per shape, captured the first time the shape is seen.

A decode step of a small model is a few hundred small kernels whose launches, not their work, bound it on a GPU.
A graph replays the whole step as one launch. Its inputs are copied into fixed buffers and its output read from a
fixed buffer, and everything else it touches must stay where it was at capture: the KV cache is written in place
(`slots.py`), and a reallocated cache drops every graph. If a capture fails (an op the model runs cannot be
captured) the engine says so once and decodes eagerly from then on. Without CUDA the same buffers are run
through the step directly: the plumbing tests see, without a capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# (ids [rows, 1], positions [rows, 1], positions attended) -> logits [rows, vocab]
Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class _Graph:
    ids: torch.Tensor
    positions: torch.Tensor
    graph: "torch.cuda.CUDAGraph | None" = None  # None without CUDA: the step runs on the buffers directly
    logits: torch.Tensor | None = None  # the graph's output buffer


class DecodeGraphs:
    def __init__(self, step: Step, device: torch.device):
        self.step, self.capture = step, device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None  # the graphs share their memory
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: str | None = None

    def __len__(self) -> int:
        return len(self.graphs)

    def clear(self) -> None:
        self.graphs.clear()

    def run(self, ids: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """The step's logits for these inputs, through the graph of their shape (made now if new)."""
        if self.failed:
            return self.step(ids, positions, span)
        shape = (ids.shape[0], span)
        found = self.graphs.get(shape)
        if found is None:
            try:
                found = self.graphs[shape] = self._record(ids, positions, span)
            except Exception as e:  # noqa: BLE001 - a model that cannot be captured still serves, eagerly
                self.failed = f"{type(e).__name__}: {e}"
                print(f"[llmray] serve: CUDA graphs off, the decode step could not be captured ({self.failed})",
                      flush=True)
                return self.step(ids, positions, span)
        else:
            found.ids.copy_(ids)
            found.positions.copy_(positions)
        if found.graph is None:
            return self.step(found.ids, found.positions, span)
        found.graph.replay()
        return found.logits.clone()  # the next replay overwrites the buffer

    def _record(self, ids: torch.Tensor, positions: torch.Tensor, span: int) -> _Graph:
        ids, positions = ids.clone(), positions.clone()
        if not self.capture:
            return _Graph(ids, positions)
        # Warm up on a side stream (lazy initialisations, library workspaces), as PyTorch's capture recipe asks.
        # It writes the same keys and values at the same positions as the replay below will: no harm done.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(ids, positions, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.step(ids, positions, span)
        return _Graph(ids, positions, graph, logits)
