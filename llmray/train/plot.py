"""The loss curve of a run, as a PNG people would rather look at than read."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(history: list[dict], path: str, title: str) -> None:
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, [h["loss"] for h in history], label="train loss", color="tab:blue")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    tps = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    if tps:
        ax2 = ax.twinx()
        ax2.plot(steps[: len(tps)], tps, color="tab:gray", alpha=0.4, lw=1)
        ax2.set_ylabel("tokens/s", color="tab:gray")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
