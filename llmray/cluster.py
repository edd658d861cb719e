"""Reaching the Ray cluster: the one in RAY_ADDRESS (as under `ray job submit`), else a local one started here."""

from __future__ import annotations

import os

from llmray import logs


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS, else start a local one; framework chatter stays off unless verbose."""
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        # a fresh local cluster needs no token; Ray 2.60 otherwise turns token auth on and its CLI refuses us
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(log_to_driver=True, logging_level=logs.ray_log_level())
