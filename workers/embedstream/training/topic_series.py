"""Normal time series for ``embedstream train`` from a range of a Kafka input topic instead of a file.

The topic holds what the time-series worker reads (``schemas/timeseries-observation.schema.json``
and ``timeseries-window.schema.json``): observations are gathered per series in timestamp order
(the offset order breaks ties), and a whole-window message is a series segment of its own, so no
training window spans two of them. A message that is not a valid observation or window of the
common channel count is skipped and counted: a reference range of normal traffic should have
none, and the log says how many there were.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from embedstream.config import Settings
from embedstream.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TopicSeries:
    """Per-series (N_i x C) float32 arrays in time order, the channel names, and where they came from."""

    series: list[np.ndarray]
    channels: list[str]
    source: dict[str, Any] = field(default_factory=dict)


def series_from_topic(
    settings: Settings,
    topic: str,
    start_offset: int | None = None,
    end_offset: int | None = None,
    partitions: Sequence[int] | None = None,
    progress: bool = False,
) -> TopicSeries:
    """The observations and windows in ``[start_offset, end_offset)`` of each partition of ``topic``."""
    from embedstream.training.detector import topic_range

    points: dict[str, list[tuple[int, int, list[float]]]] = defaultdict(list)  # series -> (time, seq, values)
    segments: list[list[list[float]]] = []
    skipped: Counter[str] = Counter()
    seq = 0
    with topic_range(settings, topic, start_offset, end_offset, partitions, progress, "train") as (parts, records):
        for rec in records:
            seq += 1
            why = _take(rec.value, seq, points, segments)
            if why:
                skipped[why] += 1
    width = _common_width(points, segments)
    series: list[np.ndarray] = []
    for sid in sorted(points):
        rows = [values for _, _, values in sorted(points[sid], key=lambda p: (p[0], p[1])) if len(values) == width]
        skipped["other_channel_count"] += len(points[sid]) - len(rows)
        if rows:
            series.append(np.asarray(rows, dtype=np.float32))
    for seg in segments:
        if all(len(row) == width for row in seg):
            series.append(np.asarray(seg, dtype=np.float32))
        else:
            skipped["other_channel_count"] += 1
    skipped = +skipped  # drop zero counts
    if skipped:
        log.warning("%s: skipped %d messages that are not normal observations or windows: %s",
                    topic, sum(skipped.values()), dict(skipped))  # fmt: skip
    if not series:
        raise ConfigError(f"no time series in {topic} offsets {start_offset}..{end_offset} (skipped: {dict(skipped)})")
    source = {"topic": topic, "start_offset": start_offset, "end_offset": end_offset, "messages": seq,
              "partitions": parts, "skipped": dict(skipped)}  # fmt: skip
    return TopicSeries(series, [f"ch{c}" for c in range(width)], source)


def _take(
    value: bytes | None,
    seq: int,
    points: dict[str, list[tuple[int, int, list[float]]]],
    segments: list[list[list[float]]],
) -> str | None:
    """File one message as a point or a segment; returns why it was skipped, or None."""
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return "not_json"
    if not isinstance(doc, dict) or not isinstance(doc.get("series_id"), str):
        return "no_series_id"
    values = doc.get("values")
    if not isinstance(values, list) or not values:
        return "no_values"
    if all(isinstance(v, list) for v in values):  # a whole window
        if not all(_finite_row(row) for row in values):
            return "non_finite"
        segments.append(values)
        return None
    timestamp = doc.get("timestamp_ms")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        return "no_timestamp"
    if not _finite_row(values):
        return "non_finite"
    points[doc["series_id"]].append((timestamp, seq, values))
    return None


def _finite_row(row: Any) -> bool:
    return (
        isinstance(row, list)
        and bool(row)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in row)
    )


def _common_width(points: dict[str, list[tuple[int, int, list[float]]]], segments: list[list[list[float]]]) -> int:
    """The channel count most messages have: the model is fitted on one shape."""
    widths: Counter[int] = Counter(len(v) for pts in points.values() for _, _, v in pts)
    widths.update(len(seg[0]) for seg in segments)
    if not widths:
        return 0
    return widths.most_common(1)[0][0]
