"""Prometheus metrics of a worker or a store sink, served on the health port at ``/metrics``.

One process runs one worker, so the default registry is enough; labels carry the modality and
model so several workers scraped together stay apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

CONSUMED = Counter("embedstream_messages_consumed", "Input messages consumed", ["modality"])
EMBEDDED = Counter("embedstream_embeddings", "Rows published to the output topic", ["modality", "model"])
DEAD_LETTERS = Counter("embedstream_dead_letters", "Messages sent to the dead-letter topic", ["modality", "reason"])
BATCH_SIZE = Histogram(
    "embedstream_batch_size", "Rows per inference batch", ["modality"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
INFERENCE_SECONDS = Histogram(
    "embedstream_inference_seconds",
    "Inference time per batch, retries included",
    ["modality", "model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
END_TO_END_SECONDS = Histogram(
    "embedstream_end_to_end_seconds",
    "Input event time to output publish",
    ["modality"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
IN_FLIGHT = Gauge("embedstream_in_flight_messages", "Consumed messages not yet finished", ["modality"])
CONSUMER_LAG = Gauge("embedstream_consumer_lag", "High watermark minus position", ["topic", "partition"])
BACKEND_ERRORS = Counter("embedstream_backend_errors", "Failed inference requests", ["model", "retriable"])
BACKEND_RETRIES = Counter("embedstream_backend_retries", "Inference retries after a retriable error", ["model"])
OUTAGES = Counter("embedstream_backend_outages", "Times the worker paused for an unavailable backend", ["model"])
DEGRADED = Gauge("embedstream_degraded", "1 while the inference backend is unavailable", ["model"])
# Drift of the traffic from the anomaly detector's normal reference, over the latest rows (drift.py).
DRIFT_MEAN_SHIFT = Gauge(
    "embedstream_drift_mean_shift",
    "Whitened distance of the window's mean embedding from the detector's reference mean, RMS per dimension",
    ["model"],
)
DRIFT_MEAN_SHIFT_EXPECTED = Gauge(
    "embedstream_drift_mean_shift_expected", "The mean shift a window of normal rows of this size shows", ["model"]
)
DRIFT_ANOMALY_RATE = Gauge("embedstream_drift_anomaly_rate", "Share of the window's rows flagged anomalous", ["model"])
DRIFT_ANOMALY_RATE_EXPECTED = Gauge(
    "embedstream_drift_anomaly_rate_expected", "Share of normal rows the threshold flags (1 - its quantile)", ["model"]
)
DRIFT_WINDOW_ROWS = Gauge("embedstream_drift_window_rows", "Rows in the drift window", ["model"])

# The store sinks (stores.sink), one store per process.
SINK_CONSUMED = Counter("embedstream_sink_messages_consumed", "Output messages the sink consumed", ["store"])
ROWS_STORED = Counter("embedstream_sink_rows", "Rows the store acknowledged (re-written rows count again)", ["store"])
SINK_DEAD_LETTERS = Counter(
    "embedstream_sink_dead_letters", "Output messages dead-lettered by the sink", ["store", "reason"]
)
STORE_OUTAGES = Counter(
    "embedstream_sink_store_outages", "Times the sink held its partitions for a failed store", ["store"]
)
STORE_DEGRADED = Gauge("embedstream_sink_degraded", "1 while the store does not acknowledge writes", ["store"])
SINK_IN_FLIGHT = Gauge("embedstream_sink_in_flight_messages", "Consumed output messages not yet stored", ["store"])
# LanceDB upkeep (stores.lance_store): streaming writes leave a fragment each; compaction folds them.
LANCEDB_FRAGMENTS = Gauge(
    "embedstream_lancedb_fragments",
    "Fragments of the table, read at upkeep and at most every 15 s of writes",
    ["table"],
)
LANCEDB_UNINDEXED_ROWS = Gauge(
    "embedstream_lancedb_unindexed_rows", "Rows the ANN index does not cover yet (all, before there is one)", ["table"]
)
LANCEDB_COMPACTIONS = Counter("embedstream_lancedb_compactions", "Compactions and index refreshes run", ["table"])


@dataclass(frozen=True)
class LoopMetrics:
    """The consume loop's metrics, labelled for what it runs (consume.loop)."""

    consumed: Any
    in_flight: Any
    outages: Any
    degraded: Any
    dead_letters: Callable[[str], Any]

    @classmethod
    def for_worker(cls, modality: str, model: str) -> LoopMetrics:
        return cls(
            CONSUMED.labels(modality),
            IN_FLIGHT.labels(modality),
            OUTAGES.labels(model),
            DEGRADED.labels(model),
            lambda reason: DEAD_LETTERS.labels(modality, reason),
        )

    @classmethod
    def for_sink(cls, store: str) -> LoopMetrics:
        return cls(
            SINK_CONSUMED.labels(store),
            SINK_IN_FLIGHT.labels(store),
            STORE_OUTAGES.labels(store),
            STORE_DEGRADED.labels(store),
            lambda reason: SINK_DEAD_LETTERS.labels(store, reason),
        )


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST


def observe_lag(consumer: Any, partitions: Iterable[Any]) -> None:
    """Consumer lag per partition from what the consumer already knows (no broker round trip)."""
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is not None:
            CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - consumer.position(tp)))


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket instead of one call per value.

    A worker observes every row's end-to-end latency, and prometheus_client has no bulk form: at a
    few microseconds a call, per-row observes were a tenth of the time-series worker's loop. This
    adds what ``observe`` adds (the sum, and each value to the first bucket whose bound is >= it)
    through the histogram's own bucket values; a histogram without them is observed value by value.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for v in values:
            histogram.observe(float(v))
        return
    if not len(values):
        return
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds))
    total.inc(float(values.sum()))
    for i in np.flatnonzero(counts[: len(bounds)]):
        buckets[i].inc(int(counts[i]))
