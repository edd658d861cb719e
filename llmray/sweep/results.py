"""What a finished sweep leaves for people: a leaderboard (printed with rich), results.csv / results.json, a plot of the
metric against each swept parameter, and the best trial exported as a Hugging Face folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmray import metric_names as M
from llmray.sweep.spec import SweepSpec

SHOWN = (M.VAL_PPL, M.LOSS, M.QUANT_PPL, M.QUANT_WEIGHTS_BYTES, M.QUANT_SIZE_RATIO, M.TOKENS_PER_S, M.STEP, M.TOKENS)


def trial_rows(spec: SweepSpec, result_grid) -> list[dict]:
    """One row per trial: its swept values, status, last reported metrics, and where its run lives."""
    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        config = result.config or _params(result.path)  # a restored sweep's failed trials come back without config
        rows.append({
            "trial": metrics.get("trial_id") or Path(result.path).name,
            "status": "failed" if result.error else ("completed" if metrics.get("completed") else "stopped early"),
            **{k: config.get(k) for k in spec.parameters},
            **{k: metrics.get(k) for k in (spec.metric.name, *SHOWN) if k in metrics},  # the sweep's own metric
            # too (eval/<task>/<metric>, rewards/accuracies, ...): what it is ranked and its best trial is named by
            "checkpoint_dir": metrics.get("checkpoint_dir"),
            "error": str(result.error).strip().splitlines()[-1][:300] if result.error else None,
            "path": result.path,
        })
    return ranked(spec, rows)


def _params(trial_path: str) -> dict:
    path = Path(trial_path, "params.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def ranked(spec: SweepSpec, rows: list[dict]) -> list[dict]:
    """Completed and stopped trials by the metric (best first), failed ones last."""
    sign = 1 if spec.metric.mode == "min" else -1
    name = spec.metric.name

    def key(r):
        v = r.get(name)
        ok = isinstance(v, (int, float)) and not math.isnan(v)
        return (0 if ok else 1, sign * v if ok else 0)

    return sorted(rows, key=key)


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    import csv

    keys = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, json_path = out / "results.csv", out / "results.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1, default=str))
    return csv_path, json_path


def leaderboard(spec: SweepSpec, rows: list[dict]) -> str:
    """The rich table as text (so it prints the same under `ray job submit` logs)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {spec.name}: {spec.metric.name} ({spec.metric.goal})")
    shown = dict.fromkeys((spec.metric.name, *SHOWN))
    columns = ["#", "trial", "status", *spec.parameters, *[k for k in shown if any(k in r for r in rows)]]
    for c in columns:
        table.add_column(c, justify="right" if c not in ("trial", "status") else "left")
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), *[_fmt(r.get(c)) for c in columns[1:]])
    console = Console(width=200, record=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def pareto_front(points: list[tuple[float, float]], sign: int = 1) -> list[tuple[float, float]]:
    """The (size, metric) points no other point beats on both: smallest first, each better than all smaller ones
    (`sign` 1: lower metric is better, -1: higher)."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if sign * y < best:
            front.append((x, y))
            best = sign * y
    return front


def trade_off(ax, done: list[dict], name: str, best: dict, sign: int) -> None:
    """The metric against the exported weights' size, with the trials no other beats on both (the Pareto front)."""
    xs = [r[M.QUANT_WEIGHTS_BYTES] / 1e6 for r in done]
    ys = [r[name] for r in done]
    ax.scatter(xs, ys, c=["tab:red" if r is best else "tab:blue" for r in done])
    ax.plot(*zip(*pareto_front(list(zip(xs, ys)), sign)), color="tab:gray", lw=1, ls="--")
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)


def plot(spec: SweepSpec, rows: list[dict], out: Path) -> Path | None:
    """The metric against each swept parameter, one panel each (log x for positive numeric ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = spec.metric.name
    done = [r for r in rows if isinstance(r.get(name), (int, float))]
    if not done:
        return None
    keys = list(spec.parameters)
    sized = name != M.QUANT_WEIGHTS_BYTES and all(isinstance(r.get(M.QUANT_WEIGHTS_BYTES), (int, float)) for r in done)
    panels = len(keys) + sized
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    best = done[0]
    if sized:
        trade_off(axes[0][-1], done, name, best, 1 if spec.metric.mode == "min" else -1)
    for ax, key in zip(axes[0], keys):
        values = [r[key] for r in done]
        ys = [r[name] for r in done]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values, ys, c=["tab:red" if r is best else "tab:blue" for r in done])
            if min(values) > 0 and max(values) / min(values) >= 10:
                ax.set_xscale("log")
        else:  # categorical: one column per value
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], ys,
                       c=["tab:red" if r is best else "tab:blue" for r in done])
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{spec.name}: {name} per trial (red: best)")
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
