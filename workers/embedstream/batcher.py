"""Micro-batching by size and age. The caller passes the clock in, so tests drive time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Collects items; a batch is due when it holds ``max_size`` items or its oldest is ``max_wait_s`` old."""

    def __init__(self, max_size: int, max_wait_s: float, clock: Callable[[], float]) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        return self._max_size - len(self._items)

    def add(self, item: T) -> None:
        if not self._items:
            self._opened_at = self._clock()
        self._items.append(item)

    def due(self) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self._max_size or self.wait_left() <= 0

    def wait_left(self) -> float:
        """Seconds until the open batch is due by age; ``max_wait_s`` when nothing is open."""
        if self._opened_at is None:
            return self._max_wait_s
        return max(0.0, self._opened_at + self._max_wait_s - self._clock())

    def take(self) -> list[T]:
        """Remove and return up to ``max_size`` items, oldest first."""
        batch, self._items = self._items[: self._max_size], self._items[self._max_size :]
        self._opened_at = self._clock() if self._items else None
        return batch
