"""Throughput, data-wait share, MFU and the progress line, measured over a window of steps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Window:
    """Steps since the last report: wall time, tokens, and time spent waiting for the data stream."""

    tokens_per_step: int
    world_size: int
    flops_per_token: float
    peak_flops_per_worker: float | None
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait: float = 0.0

    def close(self, now: float | None = None) -> dict:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        out = {
            "step_time_s": elapsed / max(self.steps, 1),
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_worker": tokens_per_s / self.world_size,
            "data_wait_share": self.data_wait / elapsed,
        }
        if self.peak_flops_per_worker:
            out["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops_per_worker * self.world_size)
        self.start, self.steps, self.data_wait = now, 0, 0.0
        return out


def progress_line(m: dict, max_steps: int, started: float, first_step: int) -> str:
    done = m["step"] - first_step
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (max_steps - m["step"])
    parts = [
        f"step {m['step']}/{max_steps}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"{m['tokens_per_s']:,.0f} tok/s",
        f"data wait {100 * m['data_wait_share']:.1f}%",
    ]
    if m.get("grad_norm") is not None:
        parts.insert(3, f"gnorm {m['grad_norm']:.2f}")
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.1f})")
    parts.append(f"ETA {format_duration(eta)}")
    return "[llmray] " + " | ".join(parts)
