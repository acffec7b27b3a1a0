"""Which offsets are safe to commit: per partition, everything below the oldest unfinished message.

A message is finished when its embedding or dead letter was acknowledged by the broker. Work may
finish out of order; the commit point only moves past a contiguous run of finished offsets.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from kafka.structs import TopicPartition


@dataclass
class _PartitionState:
    pending: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)
    high_water: int = -1  # highest offset seen


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _PartitionState] = {}
        self._committed: dict[TopicPartition, int] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        st = self._parts.get(tp)
        if st is None:  # not setdefault: that would build a state for every message
            st = self._parts[tp] = _PartitionState()
        # The first offset seen is where this worker's position started: nothing below it is ours to commit.
        self._committed.setdefault(tp, offset)
        st.pending.add(offset)
        heapq.heappush(st.heap, offset)
        st.high_water = max(st.high_water, offset)

    def done(self, tp: TopicPartition, offset: int) -> None:
        st = self._parts.get(tp)
        if st is not None:
            st.pending.discard(offset)

    def in_flight(self) -> int:
        return sum(len(st.pending) for st in self._parts.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Next offset to commit per partition, only where it moved since the last ``mark_committed``."""
        out: dict[TopicPartition, int] = {}
        for tp, st in self._parts.items():
            while st.heap and st.heap[0] not in st.pending:
                heapq.heappop(st.heap)
            nxt = st.heap[0] if st.heap else st.high_water + 1
            if nxt > self._committed.get(tp, nxt):
                out[tp] = nxt
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: list[TopicPartition]) -> None:
        """Drop state of partitions this worker no longer owns (after a rebalance)."""
        for tp in tps:
            self._parts.pop(tp, None)
            self._committed.pop(tp, None)
