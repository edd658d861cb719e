"""Throughput, data-wait share, MFU and the progress line, measured over a window of steps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmray import metric_names as M


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Window:
    """Steps since the last report: wall time, tokens, training loss, and time spent waiting for the data stream."""

    tokens_per_step: int
    world_size: int
    flops_per_token: float
    peak_flops_per_worker: float | None
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0  # trained on in the window's steps
    data_wait: float = 0.0
    loss_sum: object = 0.0  # a device tensor once steps are added: summed without a host sync per step
    part_sums: dict = field(default_factory=dict)  # named parts of the loss (distillation's lm_loss, distill_kl)

    def add_step(self, loss, parts: dict | None = None, tokens: int | None = None) -> None:
        """`tokens`: the step's, where they vary (RL's completions); default `tokens_per_step`."""
        self.steps += 1
        self.tokens += self.tokens_per_step if tokens is None else int(tokens)
        self.loss_sum = self.loss_sum + loss
        for name, value in (parts or {}).items():
            self.part_sums[name] = self.part_sums.get(name, 0.0) + value

    def parts(self) -> dict[str, float]:
        """Mean of each named part of the loss over the window."""
        return {k: float(v) / self.steps for k, v in self.part_sums.items()} if self.steps else {}

    @property
    def loss(self) -> float:
        """Mean step loss over the window (NaN when it holds no step)."""
        return float(self.loss_sum) / self.steps if self.steps else float("nan")

    def close(self, now: float | None = None) -> dict:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        out = {
            M.STEP_TIME_S: elapsed / max(self.steps, 1),
            M.TOKENS_PER_S: tokens_per_s,
            M.TOKENS_PER_S_PER_WORKER: tokens_per_s / self.world_size,
            M.DATA_WAIT_SHARE: self.data_wait / elapsed,
        }
        if self.peak_flops_per_worker:
            out[M.MFU] = self.flops_per_token * tokens_per_s / (self.peak_flops_per_worker * self.world_size)
        self.start, self.steps, self.tokens, self.data_wait, self.loss_sum, self.part_sums = now, 0, 0, 0.0, 0.0, {}
        return out


def per_source_val(m: dict) -> dict[str, float]:
    """{source: validation loss} from a report of a blend (empty for one source)."""
    prefix = M.per_source(M.VAL_LOSS, "")
    return {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}


def eval_by_task(m: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from a report's eval/<task>/<metric> figures."""
    out: dict[str, dict[str, float]] = {}
    for key, value in m.items():
        if key.startswith(M.EVAL_PREFIX):
            task, _, metric = key[len(M.EVAL_PREFIX):].partition("/")
            out.setdefault(task, {})[metric] = value
    return out


def progress_line(m: dict, max_steps: int, started: float, first_step: int) -> str:
    done = m[M.STEP] - first_step
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (max_steps - m[M.STEP])
    parts = [
        f"step {m[M.STEP]}/{max_steps}",
        f"loss {m[M.LOSS]:.4f}",
        f"lr {m[M.LR]:.2e}",
        f"{m[M.TOKENS_PER_S]:,.0f} tok/s",
        f"data wait {100 * m[M.DATA_WAIT_SHARE]:.1f}%",
    ]
    if M.DISTILL_KL in m:
        parts.insert(2, f"lm {m[M.LM_LOSS]:.4f} kl {m[M.DISTILL_KL]:.4f}")
    if M.REWARD in m:  # online RL
        rl = f"reward {m[M.REWARD]:.3f}"
        if m.get(M.ACCURACY) == m.get(M.ACCURACY):  # not NaN: a correctness reward gives one
            rl += f" acc {100 * m[M.ACCURACY]:.0f}%"
        rl += f" len {m[M.COMPLETION_LENGTH]:.1f}"
        if M.KL in m:
            rl += f" kl {m[M.KL]:.4f}"
        parts.insert(2, rl)
        parts.append(f"gen {m[M.ROLLOUT_TOKENS_PER_S]:,.0f} tok/s")
    if M.REWARDS_ACCURACIES in m:
        parts.insert(2, f"reward acc {100 * m[M.REWARDS_ACCURACIES]:.0f}% margin {m[M.REWARDS_MARGINS]:.3f}")
    if m.get(M.GRAD_NORM) is not None:
        parts.insert(3, f"gnorm {m[M.GRAD_NORM]:.2f}")
    if M.MFU in m:
        parts.append(f"MFU {100 * m[M.MFU]:.1f}%")
    if M.VAL_LOSS in m:
        parts.append(f"val {m[M.VAL_LOSS]:.4f} (ppl {m[M.VAL_PPL]:.1f})")
    if M.validation(M.REWARDS_ACCURACIES) in m:
        parts.append(f"val reward acc {100 * m[M.validation(M.REWARDS_ACCURACIES)]:.0f}%")
        per_source = per_source_val(m)
        if per_source:
            parts.append("val " + ", ".join(f"{name} {loss:.3f}" for name, loss in per_source.items()))
    for task, figures in eval_by_task(m).items():
        parts.append(f"{task} " + " ".join(f"{name} {value:.3f}" for name, value in figures.items()))
    if M.EVAL_S in m:
        parts.append(f"eval {m[M.EVAL_S]:.1f}s")
    parts.append(f"ETA {format_duration(eta)}")
    return "[llmray] " + " | ".join(parts)
