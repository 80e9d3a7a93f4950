"""Router evaluation: accuracy, macro-F1, confusion matrix, fallback rate, latency."""

from __future__ import annotations

import statistics
import time

from expertswitch.router.router import Router


def classification_report(router: Router, queries, labels: list[str]) -> dict:
    routes = router.route(queries)
    names = list(router.experts)
    routed = [r for r in routes if not r.fallback]
    # accuracy counts fallbacks as misses; routed accuracy looks only at routed queries
    correct = [r.expert == lbl for r, lbl in zip(routes, labels)]
    confusion = {t: {p: 0 for p in [*names, router.default]} for t in names}
    for r, lbl in zip(routes, labels):
        if lbl in confusion:
            confusion[lbl][r.expert] = confusion[lbl].get(r.expert, 0) + 1
    f1s = []
    for e in names:
        tp = sum(r.expert == e and lbl == e for r, lbl in zip(routes, labels))
        fp = sum(r.expert == e and lbl != e for r, lbl in zip(routes, labels))
        fn = sum(r.expert != e and lbl == e for r, lbl in zip(routes, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    routed_ok = sum(r.expert == lbl for r, lbl in zip(routes, labels) if not r.fallback)
    return {
        "examples": len(labels),
        "accuracy": round(sum(correct) / max(1, len(labels)), 4),
        "macro_f1": round(sum(f1s) / len(f1s), 4),
        "fallback_rate": round(1 - len(routed) / max(1, len(routes)), 4),
        "routed_accuracy": round(routed_ok / max(1, len(routed)), 4),
        "confusion": confusion,
    }


def latency_report(router: Router, queries, n: int = 100, batch_size: int = 64) -> dict:
    """p50/p99 milliseconds per query at batch 1, and queries/s in batches."""
    sample = (list(queries) * (n // max(1, len(queries)) + 1))[:n]
    router.route(sample[:5])  # warm-up
    times = []
    for q in sample:
        t0 = time.perf_counter()
        router.route([q])
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    t0 = time.perf_counter()
    router.route(sample, batch_size=batch_size)
    batched = time.perf_counter() - t0
    return {
        "batch1_p50_ms": round(statistics.median(times), 2),
        "batch1_p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
        f"batch{batch_size}_queries_per_s": round(len(sample) / batched, 1),
    }
