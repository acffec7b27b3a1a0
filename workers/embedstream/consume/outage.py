"""What the loop does while its stage cannot take work (Triton away, a store failing): hold, probe, resume.

The loop pauses its partitions (it stays in the consumer group and keeps heartbeating), keeps the
batches the stage could not take, and probes with exponential backoff. Nothing held here is
committed: if the loop stops before the stage returns, the next owner of the partitions re-reads
these messages. A probe that lets the held work through, only to see it fail again, continues the
same outage (the backoff keeps growing) rather than starting a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kafka.structs import TopicPartition


class OutageGate:
    def __init__(self, clock: Callable[[], float], first_probe_s: float = 0.5, max_probe_s: float = 5.0) -> None:
        self._clock = clock
        self._first = first_probe_s
        self._max = max_probe_s
        self._delay = first_probe_s
        self._next_probe = 0.0
        self._released: tuple[float, float] | None = None  # (since, delay) of an outage a probe just ended
        self.since: float | None = None
        self.reason = ""
        self.stalled: list[list[Any]] = []

    @property
    def active(self) -> bool:
        return self.since is not None

    @property
    def held_messages(self) -> int:
        return sum(len(b) for b in self.stalled)

    def enter(self, reason: str) -> bool:
        """Start (or continue) an outage; True when this call started a new one."""
        self.reason = reason
        if self.since is not None:
            return False
        if self._released is not None:  # the released work failed again: the same outage, backing off
            self.since, delay = self._released
            self._released = None
            self._delay = min(self._max, delay * 2)
            self._next_probe = self._clock() + self._delay
            return False
        self.since = self._clock()
        self._delay = self._first
        self._next_probe = self.since + self._delay
        return True

    def succeeded(self) -> None:
        """Work went through: a later failure is a new outage."""
        self._released = None

    def hold(self, batch: list[Any]) -> None:
        self.stalled.append(batch)

    def probe_due(self) -> bool:
        return self.active and self._clock() >= self._next_probe

    def probe_failed(self) -> None:
        self._delay = min(self._max, self._delay * 2)
        self._next_probe = self._clock() + self._delay

    def release(self) -> tuple[list[list[Any]], float]:
        """End the outage; returns the held batches (oldest first) and how long it lasted."""
        started = self.since if self.since is not None else self._clock()
        batches, self.stalled = self.stalled, []
        self._released = (started, self._delay)
        self.since = None
        self.reason = ""
        return batches, self._clock() - started

    def drop_partitions(self, partitions: Iterable[TopicPartition]) -> int:
        """Forget held items of partitions this loop lost; their new owner re-reads them."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        before = self.held_messages
        self.stalled = [
            kept
            for kept in ([it for it in b if (it.source.topic, it.source.partition) not in lost] for b in self.stalled)
            if kept
        ]
        return before - self.held_messages
