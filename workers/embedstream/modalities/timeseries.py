"""Time series: observations windowed per series, or whole windows, -> (T x C) float32 model input.

Window length T and channel count C come from the model (the encoder spec, i.e. what it was
trained on); the stride and the memory bounds from ``[timeseries]`` settings. Windowing is by
point count and event time only; it never reads a clock.

The rules (also in ``schemas/timeseries-observation.schema.json``):

* **Windows.** Each series (keyed by topic, partition and ``series_id``) keeps its last T points.
  When it holds T points it emits a window row, then drops its oldest ``stride`` points. With
  stride S < T consecutive windows overlap by T - S points; stride > T is refused (points would
  fall between windows). Producers should key observations by series id so a series stays on one
  partition; a series spread over partitions is windowed per partition.
* **Which offsets a window finishes.** A point is finished by the *last* window that contains it:
  the S points dropped after an emission are that window's ``covers`` (the row's
  ``messages_finished``); the worker marks exactly those offsets done when the row is acked. Points
  still in a series' buffer stay unfinished, so the partition's committed offset stays behind the
  oldest of them. A window message (a whole window in one message) is one row finishing itself.
* **Late and out-of-order points.** A point whose ``timestamp_ms`` is not after the last accepted
  point of its series is dead-lettered with reason ``late`` (no reordering buffer). Bad points
  (``non_finite``, ``wrong_shape``, ``invalid_timeseries``) are dead-lettered and skipped: the
  window is built from the valid points around them, without imputation.
* **Memory and eviction.** At most ``max_series`` series are held per worker; a new series evicts
  the least recently updated one. With ``idle_evict_ms`` set, a least recently updated series whose
  newest point is that far (event time) behind the newest point of its partition is evicted too.
  The unfinished points of an evicted series are dead-lettered with reason ``evicted`` (their
  original bytes, so they can be replayed), so they never hold commits back; a later point of that
  series starts a new window. Memory is bounded by max_series x T points (values and raw bytes).
* **Restart and rebalance.** Window state lives in memory only and is rebuilt from the log: after
  a crash, a restart or losing a partition, the next owner re-reads from the committed offset, which
  is at or before the oldest unfinished point of every series, so no window is lost silently. For
  the series whose oldest point set the commit point the rebuilt windows are exactly the ones it
  would have emitted. Other series of the partition re-read points that were already finished:
  their windows from that stretch may be published again (at-least-once duplicates) and their
  boundaries after the restart start from the first re-read point.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from kafka.structs import TopicPartition

from embedstream.config import Settings
from embedstream.decode.timeseries import Observation, TimeSeriesWindow, parse_timeseries
from embedstream.encoders import EncoderSpec
from embedstream.errors import ConfigError
from embedstream.modalities import register_modality
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import RowMeta
from embedstream.worker import Deferred

_Key = tuple[str, int, str]  # topic, partition, series_id
_ABSORBED = Deferred()


@dataclass
class _Series:
    points: deque[Observation] = field(default_factory=deque)
    last_ts: int = -1
    in_published: int = 0  # leading buffered points that were already part of an emitted window


class SlidingWindows:
    """Per-series count windows with LRU-bounded state; returns windows and the dead letters it decides."""

    def __init__(self, length: int, stride: int, max_series: int, idle_evict_ms: int | None = None) -> None:
        if not 1 <= stride <= length:
            raise ConfigError(f"timeseries.stride must be from 1 to the window length {length}, got {stride}")
        self.length = length
        self.stride = stride
        self.max_series = max_series
        self.idle_evict_ms = idle_evict_ms
        self._series: OrderedDict[_Key, _Series] = OrderedDict()
        self._newest: dict[tuple[str, int], int] = {}  # newest event time per partition, for idle eviction
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._series)

    def open_points(self) -> int:
        return sum(len(s.points) for s in self._series.values())

    def add(self, obs: Observation) -> tuple[TimeSeriesWindow | BadRecord | None, list[BadRecord]]:
        """Take one point: (a completed window, a ``late`` dead letter or None; dead letters of evictions)."""
        src = obs.source
        key = (src.topic, src.partition, obs.series_id)
        st = self._series.get(key)
        if st is not None and obs.timestamp_ms <= st.last_ts:
            self.counters["late"] += 1
            why = (
                f"timestamp_ms {obs.timestamp_ms} is not after the last accepted point of series "
                f"{obs.series_id!r} ({st.last_ts}); points must arrive in time order per series"
            )
            return BadRecord(src, "late", why), []
        part = (src.topic, src.partition)
        self._newest[part] = max(self._newest.get(part, obs.timestamp_ms), obs.timestamp_ms)
        dead: list[BadRecord] = []
        if st is None:
            st = self._series[key] = _Series()
            self.counters["series_opened"] += 1
            while len(self._series) > self.max_series:
                dead += self._evict(*self._series.popitem(last=False), f"over max_series={self.max_series}")
        else:
            self._series.move_to_end(key)
        dead += self._evict_idle(key)
        st.points.append(obs)
        st.last_ts = obs.timestamp_ms
        if len(st.points) < self.length:
            self.counters["absorbed"] += 1
            return None, dead
        pts = st.points
        window = TimeSeriesWindow(
            source=src,
            series_id=obs.series_id,
            start_ms=pts[0].timestamp_ms,
            end_ms=pts[-1].timestamp_ms,
            values=np.stack([p.values for p in pts]),
            covers=tuple(
                (TopicPartition(p.source.topic, p.source.partition), p.source.offset)
                for p in (pts[i] for i in range(self.stride))
            ),
        )
        for _ in range(self.stride):
            pts.popleft()
        st.in_published = len(pts)
        self.counters["windows"] += 1
        return window, dead

    def _evict_idle(self, current: _Key) -> list[BadRecord]:
        # Only the least recently updated series are looked at: O(1) per point, not a scan.
        dead: list[BadRecord] = []
        if self.idle_evict_ms is None:
            return dead
        while self._series:
            key, st = next(iter(self._series.items()))
            if key == current or st.last_ts >= self._newest[key[:2]] - self.idle_evict_ms:
                break
            del self._series[key]
            dead += self._evict(key, st, f"idle for more than {self.idle_evict_ms} ms of event time")
        return dead

    def _evict(self, key: _Key, st: _Series, why: str) -> list[BadRecord]:
        self.counters["series_evicted"] += 1
        self.counters["points_evicted"] += len(st.points)
        n = len(st.points)
        msg = (
            f"series {key[2]!r} evicted ({why}) with {n} unfinished point(s), {st.in_published} of them "
            "already part of a published window"
        )
        return [BadRecord(p.source, "evicted", msg, "Eviction") for p in st.points]

    def forget(self, partitions: Sequence[TopicPartition]) -> int:
        """Drop the state of lost partitions; returns the points dropped (their new owner re-reads them)."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        gone = [k for k in self._series if k[:2] in lost]
        dropped = sum(len(self._series.pop(k).points) for k in gone)
        for part in lost:
            self._newest.pop(part, None)
        return dropped


class TimeSeriesModality:
    name = "timeseries"

    def __init__(self, spec: EncoderSpec, settings: Settings) -> None:
        dims = spec.inputs[0].dims
        if len(dims) != 2 or spec.inputs[0].dtype != "FP32":
            raise ConfigError(f"encoder {spec.name} does not take (window x channels) FP32 windows: {spec.inputs[0]}")
        self.window_length, self.channels = dims
        ts = settings.timeseries
        self._max_bytes = ts.max_message_bytes
        self.windows = SlidingWindows(
            self.window_length, ts.stride or self.window_length, ts.max_series, ts.idle_evict_ms
        )

    def decode(self, msg: SourceMessage) -> TimeSeriesWindow | BadRecord | Deferred:
        parsed = parse_timeseries(msg, self.window_length, self.channels, self._max_bytes)
        if not isinstance(parsed, Observation):
            return parsed
        item, dead = self.windows.add(parsed)
        if item is None and not dead:
            return _ABSORBED  # most points: one shared instance instead of one per message
        return Deferred(item, tuple(dead))

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[TimeSeriesWindow | BadRecord | Deferred]:
        return [self.decode(m) for m in msgs]  # in order: each point may complete its series' window

    def stack(self, items: Sequence[TimeSeriesWindow]) -> tuple[np.ndarray, ...]:
        return (np.stack([it.values for it in items]).astype(np.float32, copy=False),)

    def row(self, item: TimeSeriesWindow) -> RowMeta:
        src = item.source
        return RowMeta(
            key=src.key,
            id=f"{item.series_id}@{item.end_ms}",
            topic=src.topic,
            partition=src.partition,
            offset=src.offset,
            timestamp_ms=item.end_ms,
            extra=(item.series_id, item.start_ms, item.end_ms, item.points, len(item.covers)),
        )

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        self.windows.forget(partitions)


register_modality("timeseries", TimeSeriesModality)
