"""The loss curve of a run (and an RL run's reward curve beneath it), as a PNG people would rather look at than
read."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(history: list[dict], path: str, title: str) -> None:
    steps = [h["step"] for h in history]
    rl = [h for h in history if "reward" in h]
    if rl:
        fig, (ax, below) = plt.subplots(2, 1, figsize=(8, 7), dpi=110, sharex=True)
        below.plot([h["step"] for h in rl], [h["reward"] for h in rl], label="reward (mean)", color="tab:green")
        accuracy = [(h["step"], h["accuracy"]) for h in rl if h.get("accuracy") == h.get("accuracy")]  # not NaN
        if accuracy:
            below.plot(*zip(*accuracy), label="accuracy", color="tab:purple", alpha=0.7)
        below.set_xlabel("step")
        below.set_ylabel("reward")
        below.grid(alpha=0.3)
        below.legend(loc="lower right")
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, [h["loss"] for h in history], label="train loss", color="tab:blue")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    if not rl:
        ax.set_xlabel("step")
    ax.set_ylabel("loss" if rl else "loss (nats/token)")
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
