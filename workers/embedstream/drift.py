"""Drift of a served model's traffic away from its anomaly detector's normal reference (docs/anomaly.md).

Over a sliding window of the latest rows (``WINDOW_ROWS``, whole batches), the worker keeps:

- the **mean shift**: the distance of the window's mean embedding (of L2-normalised rows, as the
  detector sees them) from the reference mean, whitened as the Mahalanobis detector whitens, as a
  root mean square per dimension: in reference standard deviations. A window of ``n`` normal rows
  shows about ``sqrt(score_mean / n)`` (the held-out rows' mean score over ``n``), exported beside it
  as the expected value; traffic that moved as a whole shows more, even while few rows pass the
  threshold alone.
- the **anomaly rate**: the share of the window's rows the served model flagged, beside the rate
  the threshold lets through on normal rows (``1 - quantile``).

Both are Prometheus gauges per model (``metrics.py``); ``deploy/prometheus/alerts.yml`` alerts on
them. The rate needs only the served columns. The mean shift needs the detector's tensors: the
worker reads them from ``encoder.detector`` when that names the file the served model was exported
with (its threshold and dimension must be the served spec's), and leaves the gauge unset otherwise,
and for a kNN detector, which has no whitening.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstream import anomaly, metrics

if TYPE_CHECKING:
    from embedstream.config import Settings
    from embedstream.encoders import EncoderSpec

log = logging.getLogger(__name__)

WINDOW_ROWS = 1000


@dataclass
class _Batch:
    rows: int
    flagged: int
    total: np.ndarray | None  # sum of the batch's L2-normalised embeddings


class DriftMonitor:
    """The sliding window of one served model's rows and its gauges."""

    def __init__(
        self,
        spec: EncoderSpec,
        summary: dict[str, Any],
        tensors: dict[str, np.ndarray] | None = None,
        window_rows: int = WINDOW_ROWS,
    ) -> None:
        self.model = spec.name
        self.window_rows = window_rows
        self._embedding = spec.embedding_output.name
        self._flag = next(o.name for o in spec.outputs if o.column == anomaly.FLAG_COLUMN)
        self._tensors = tensors
        self._score_mean = float(summary.get("score_mean", 0.0))
        self._batches: deque[_Batch] = deque()
        self._rows = self._flagged = 0
        self._total: np.ndarray | None = None
        self._shift = metrics.DRIFT_MEAN_SHIFT.labels(self.model)
        self._shift_expected = metrics.DRIFT_MEAN_SHIFT_EXPECTED.labels(self.model)
        self._rate = metrics.DRIFT_ANOMALY_RATE.labels(self.model)
        self._rows_gauge = metrics.DRIFT_WINDOW_ROWS.labels(self.model)
        metrics.DRIFT_ANOMALY_RATE_EXPECTED.labels(self.model).set(1.0 - float(summary.get("quantile", 1.0)))

    @classmethod
    def for_worker(cls, spec: EncoderSpec, settings: Settings) -> DriftMonitor | None:
        """A monitor where the served model returns a detector's flag (``extra.detector``); else None."""
        summary = spec.extra.get(anomaly.SPEC_KEY)
        if not summary or not any(o.column == anomaly.FLAG_COLUMN for o in spec.outputs):
            if settings.encoder.detector:
                log.warning(
                    "encoder.detector is %s, but the served %s has no detector: its rows carry no anomaly "
                    "columns; export the model again with it",
                    settings.encoder.detector,
                    spec.name,
                )
            return None
        return cls(spec, summary, _served_tensors(spec, summary, settings.encoder.detector))

    @property
    def mean_shift(self) -> float | None:
        """The window's mean shift in reference standard deviations; None without whitening tensors or rows."""
        if self._tensors is None or self._total is None or not self._rows:
            return None
        mean = self._total / self._rows
        return math.sqrt(float(anomaly.whitened_sq_distance(self._tensors, mean[None])[0]) / len(mean))

    @property
    def anomaly_rate(self) -> float:
        return self._flagged / self._rows if self._rows else 0.0

    def observe(self, outputs: dict[str, np.ndarray]) -> None:
        """Add one inference batch's outputs to the window and update the gauges."""
        flags = np.asarray(outputs[self._flag]).reshape(-1)
        total = None
        if self._tensors is not None:
            total = anomaly.normalise(outputs[self._embedding]).sum(axis=0)
        batch = _Batch(len(flags), int(flags.sum()), total)
        self._batches.append(batch)
        self._add(batch, 1)
        while self._rows - self._batches[0].rows >= self.window_rows:
            self._add(self._batches.popleft(), -1)
        self._rate.set(self.anomaly_rate)
        shift = self.mean_shift
        if shift is not None:
            self._shift.set(shift)
            self._shift_expected.set(math.sqrt(max(self._score_mean, 0.0) / self._rows))
        # Last: a scrape that sees this window's size sees this window's values (scrapes are not atomic).
        self._rows_gauge.set(self._rows)

    def _add(self, batch: _Batch, sign: int) -> None:
        self._rows += sign * batch.rows
        self._flagged += sign * batch.flagged
        if batch.total is not None:
            self._total = batch.total * sign if self._total is None else self._total + sign * batch.total


def _served_tensors(spec: EncoderSpec, summary: dict[str, Any], path: str | None) -> dict[str, np.ndarray] | None:
    """The Mahalanobis detector's tensors from ``path`` when it is the one served; else None (logged)."""
    if path is None or summary.get("kind") != "mahalanobis":
        return None
    try:
        fitted = anomaly.load(path)
    except Exception as exc:  # the rate still works: say why the mean shift does not
        log.warning("drift: no mean shift for %s: cannot read encoder.detector %s: %s", spec.name, path, exc)
        return None
    side = fitted.side
    if side.kind != "mahalanobis" or side.threshold != summary.get("threshold") or side.dim != spec.embedding_dim:
        log.warning(
            "drift: no mean shift for %s: encoder.detector %s (threshold %s) is not the served detector (threshold %s)",
            spec.name,
            path,
            side.threshold,
            summary.get("threshold"),
        )
        return None
    return {k: np.asarray(v, np.float64) for k, v in fitted.tensors.items()}
