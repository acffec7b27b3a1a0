"""The bulk histogram observe the worker uses for per-row latencies adds what one observe per value adds."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from embedstream.metrics import observe_many

BUCKETS = (0.01, 0.025, 0.05, 0.1, 1, 5)


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value) for m in registry.collect() for s in m.samples if not s.name.endswith("_created")
    ]


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 0.01, 0.0100001, 0.05, 0.3, 7.0, 1.0, 100.0, 0.025],  # on, just above and beyond the bounds
        [],
        [0.2] * 300,
    ],
)
def test_observe_many_equals_one_observe_per_value(values: list[float]) -> None:
    one, bulk = CollectorRegistry(), CollectorRegistry()
    by_one = Histogram("latency", "l", ["modality"], buckets=BUCKETS, registry=one).labels("text")
    by_bulk = Histogram("latency", "l", ["modality"], buckets=BUCKETS, registry=bulk).labels("text")
    for v in values:
        by_one.observe(v)
    observe_many(by_bulk, np.asarray(values, dtype=np.float64))
    expected, got = _samples(one), _samples(bulk)
    # Counts are exact; the sum is the same float64 sum taken in another order.
    assert [(n, lab) for n, lab, _ in got] == [(n, lab) for n, lab, _ in expected]
    for (_, _, want), (name, _, have) in zip(expected, got, strict=True):
        if name.endswith("_sum"):
            assert have == pytest.approx(want, rel=1e-12)
        else:
            assert have == want
