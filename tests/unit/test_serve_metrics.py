"""GET /metrics' text: Prometheus exposition of each replica's engine figures, vLLM's names under llmray:."""

from prometheus_client.parser import text_string_to_metric_families


def test_two_replicas_figures_are_labelled_and_sum_as_prometheus_would():
    from llmray.serve.metrics import EngineMetrics, render

    snapshots = {}
    for replica, (ttfts, tokens) in {"r1": ([0.003, 0.2], 10), "r2": ([30.0], 5)}.items():
        m = EngineMetrics()
        for t in ttfts:
            m.observe("time_to_first_token_seconds", t)
        m.add("request_rejected_total", 2, reason="queue_full")
        m.add("request_success_total", finished_reason="length")
        snap = m.snapshot({"num_requests_waiting": len(ttfts), "num_requests_running": 1})
        snap["counters"].append(["generation_tokens_total", {}, tokens])
        snapshots[(replica, "tiny")] = snap
    families = {f.name: f for f in text_string_to_metric_families(render(snapshots))}  # parses, or raises
    assert {"llmray:num_requests_waiting", "llmray:time_to_first_token_seconds", "llmray:generation_tokens",
            "llmray:request_rejected", "llmray:time_per_output_token_seconds"} <= set(families)

    def total(family: str, sample: str, **labels) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and labels.items() <= s.labels.items())

    assert total("llmray:generation_tokens", "llmray:generation_tokens_total") == 15
    assert total("llmray:generation_tokens", "llmray:generation_tokens_total", replica="r2") == 5
    assert total("llmray:request_rejected", "llmray:request_rejected_total", reason="queue_full") == 4
    assert total("llmray:num_requests_waiting", "llmray:num_requests_waiting") == 3
    ttft = "llmray:time_to_first_token_seconds"
    assert total(ttft, ttft + "_count") == 3 and abs(total(ttft, ttft + "_sum") - 30.203) < 1e-9
    assert total(ttft, ttft + "_bucket", le="0.005") == 1 and total(ttft, ttft + "_bucket", le="0.25") == 2
    assert total(ttft, ttft + "_bucket", le="+Inf") == 3  # buckets are cumulative


def test_the_dashboard_reads_only_metrics_the_app_exports():
    """serve/grafana_dashboard.json: every llmray: series its queries name is one GET /metrics writes (a renamed
    metric would leave a panel empty)."""
    import json
    import re

    from llmray.serve.metrics import METRICS

    exported = {f"llmray:{n}{suffix}" for n, (kind, _) in METRICS.items()
                for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))}
    dashboard = json.load(open("serve/grafana_dashboard.json"))
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for q in queries for m in re.findall(r"llmray:[a-z0-9_]+", q)}
    assert named and named <= exported, named - exported
    assert {"llmray:time_to_first_token_seconds_bucket", "llmray:num_requests_waiting",
            "llmray:request_rejected_total"} <= named
