"""Prometheus metrics (`GET /metrics`), vLLM's names with an `expertswitch_` prefix where they
overlap. Request-level figures are recorded as requests finish; engine-level ones (queue depth,
KV blocks, expert residency, pool counters, switch time) are read from the engine thread at
scrape time. Each server has its own registry, so several can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_POOL_COUNTERS = ("device_hits", "host_hits", "disk_loads", "load_waits", "prefetches",
                  "evictions_device", "evictions_host", "failures", "switches")  # fmt: skip


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("expertswitch_request_success", "finished requests (choices) "
                                "by finish reason", ["model", "finished_reason"],
                                registry=r)  # fmt: skip
        self.http_errors = Counter("expertswitch_http_errors", "requests refused or failed",
                                   ["status"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("expertswitch_prompt_tokens", "prompt tokens processed",
                                     ["model"], registry=r)  # fmt: skip
        self.generation_tokens = Counter("expertswitch_generation_tokens", "tokens generated",
                                         ["model"], registry=r)  # fmt: skip
        self.routed = Counter("expertswitch_routed_requests", "requests to model 'auto', by the "
                              "expert the router chose", ["expert", "fallback"],
                              registry=r)  # fmt: skip
        self.ttft = Histogram("expertswitch_time_to_first_token_seconds", "arrival to first "
                              "token", ["model"], buckets=_LATENCY, registry=r)  # fmt: skip
        self.itl = Histogram("expertswitch_inter_token_latency_seconds", "time between a "
                             "request's consecutive tokens", ["model"], buckets=_LATENCY,
                             registry=r)  # fmt: skip
        self.e2e = Histogram("expertswitch_e2e_request_latency_seconds", "arrival to last token",
                             ["model"], buckets=_LATENCY + (160.0, 320.0), registry=r)  # fmt: skip
        self.snapshot: dict = {}
        r.register(_EngineCollector(self))

    def render(self, snapshot: dict) -> bytes:
        self.snapshot = snapshot
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []  # collected at scrape time; nothing to check at registration

    def collect(self):
        s = self.metrics.snapshot
        if not s:
            return
        for name, doc, value in (
            ("num_requests_waiting", "requests queued for admission", s["waiting"]),
            ("num_requests_running", "requests in the running batch", s["running"]),
            ("kv_blocks_used", "KV-cache blocks held by sequences", s["kv_blocks_used"]),
            ("kv_blocks_total", "KV-cache blocks in all", s["kv_blocks_total"]),
            ("requests_in_flight", "HTTP requests (choices) awaiting tokens", s["in_flight"]),
        ):
            yield GaugeMetricFamily(f"expertswitch_{name}", doc, value=value)
        used = s["kv_blocks_used"] / max(1, s["kv_blocks_total"])
        yield GaugeMetricFamily("expertswitch_kv_cache_usage_perc", "KV-cache share in use",
                                value=used)  # fmt: skip
        res = GaugeMetricFamily("expertswitch_expert_residency", "1 for the tier each expert is "
                                "in now", labels=["expert", "tier"])  # fmt: skip
        for name, tier in sorted(s["residency"].items()):
            res.add_metric([name, tier], 1)
        yield res
        nbytes = GaugeMetricFamily("expertswitch_expert_bytes", "bytes an expert holds once "
                                   "loaded (its packed parts)", labels=["expert"])  # fmt: skip
        for name, n in sorted(s.get("expert_bytes", {}).items()):
            nbytes.add_metric([name], n)
        yield nbytes
        for key, doc in (
            ("queries", "prompt tokens looked up in the prefix cache"),
            ("hits", "prompt tokens found in the prefix cache"),
        ):
            yield CounterMetricFamily(f"expertswitch_prefix_cache_{key}", doc,
                                      value=s[f"prefix_cache_{key}"])  # fmt: skip
        yield CounterMetricFamily("expertswitch_engine_aborts", "requests the engine stopped "
                                  "before they finished (client gone, abort)",
                                  value=s["aborted"])  # fmt: skip
        pool = s["pool"]
        for key in _POOL_COUNTERS:
            yield CounterMetricFamily(f"expertswitch_pool_{key}", f"expert pool: {key}",
                                      value=pool[key])  # fmt: skip
        yield CounterMetricFamily("expertswitch_pool_switch_seconds", "wall time of expert "
                                  "switches (loads that were not device hits)",
                                  value=pool["switch_time_total_s"])  # fmt: skip
        yield GaugeMetricFamily("expertswitch_pool_last_switch_seconds", "the latest switch",
                                value=pool["switch_time_last_s"])  # fmt: skip
