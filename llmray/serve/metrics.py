"""What an engine counts for GET /metrics, and the Prometheus text format it is written in.

Names follow vLLM's (`vllm:num_requests_waiting`, `vllm:time_to_first_token_seconds`, ...) under the `llmray:`
prefix, so a vLLM dashboard's queries carry over by changing the prefix. Every series carries `model_name` and
`replica` labels: each replica counts its own requests, GET /metrics (on any replica) lists every live replica's
series, and a query sums them (`sum by (model_name) (rate(llmray:generation_tokens_total[1m]))`). A restarted
replica starts new series from zero, which Prometheus' rate() reads as a counter reset, not a drop.
"""

from __future__ import annotations

import bisect
import threading

PREFIX = "llmray:"
# vLLM's buckets for the same histograms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)

# name -> (type, help); the one place each metric is named
METRICS = {
    "num_requests_running": ("gauge", "Rows in the running batch (each holds a KV-cache slot)"),
    "num_requests_waiting": ("gauge", "Rows queued for admission to the batch (bounded by max_waiting_requests)"),
    "kv_cache_usage_bytes": ("gauge", "Bytes the KV-cache slots hold now"),
    "kv_cache_budget_bytes": ("gauge", "Bytes the KV cache may take (kv_cache_bytes, or free device memory)"),
    "prompt_tokens_total": ("counter", "Prompt tokens prefilled"),
    "generation_tokens_total": ("counter", "Tokens generated"),
    "request_success_total": ("counter", "Rows finished, by finished_reason (stop, length)"),
    "request_cancelled_total": ("counter", "Rows stopped before they finished: client gone or deadline passed"),
    "request_rejected_total": ("counter", "Requests refused, by reason (queue_full: 429; kv_cache: too large)"),
    "request_timeout_total": ("counter", "Requests past request_timeout_s (an error to the client)"),
    "time_to_first_token_seconds": ("histogram", "From arrival at the replica to the first token"),
    "time_per_output_token_seconds": ("histogram", "Mean time per generated token after the first, per row"),
    "e2e_request_latency_seconds": ("histogram", "From arrival at the replica to the last token, per row"),
}


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}


class EngineMetrics:
    """One engine's counters and histograms; the compute thread writes, a route reads `snapshot()`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.histograms = {"time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
                           "time_per_output_token_seconds": Histogram(TPOT_BUCKETS),
                           "e2e_request_latency_seconds": Histogram(E2E_BUCKETS)}

    def add(self, name: str, value: float = 1, **labels) -> None:
        assert name in METRICS, name
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)

    def snapshot(self, gauges: dict[str, float]) -> dict:
        with self._lock:
            return {"gauges": dict(gauges),
                    "counters": [[n, dict(ls), v] for (n, ls), v in self.counters.items()],
                    "histograms": {n: h.snapshot() for n, h in self.histograms.items()}}


def _labels(labels: dict) -> str:
    def esc(v) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(v: float) -> str:
    return repr(float(v)) if v != int(v) else str(int(v))


def render(snapshots: dict[tuple[str, str], dict]) -> str:
    """Prometheus text exposition (version 0.0.4) of {(replica, model_name): EngineMetrics.snapshot()}."""
    lines = []
    for name, (kind, help_) in METRICS.items():
        full = PREFIX + name
        lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
        for (replica, model), snap in sorted(snapshots.items()):
            base = {"model_name": model, "replica": replica}
            if kind == "gauge":
                lines.append(f"{full}{_labels(base)} {_number(snap['gauges'].get(name, 0))}")
            elif kind == "counter":
                values = [(ls, v) for n, ls, v in snap["counters"] if n == name]
                for ls, v in values or [({}, 0)]:
                    lines.append(f"{full}{_labels({**base, **ls})} {_number(v)}")
            else:
                h = snap["histograms"][name]
                running = 0
                for bound, c in zip(list(h["buckets"]) + ["+Inf"], h["counts"]):
                    running += c
                    le = bound if bound == "+Inf" else _number(bound)
                    lines.append(f"{full}_bucket{_labels({**base, 'le': le})} {running}")
                lines.append(f"{full}_sum{_labels(base)} {_number(h['sum'])}")
                lines.append(f"{full}_count{_labels(base)} {running}")
    return "\n".join(lines) + "\n"
