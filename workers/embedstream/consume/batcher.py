"""Micro-batching by size and age. The caller passes the clock in, so tests drive time.

Size is counted in items (a message each for the worker) or, with ``weight``, in what an item
holds (rows of an output message for a store sink).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Collects items; a batch is due when it holds ``max_size`` items or its oldest is ``max_wait_s`` old."""

    def __init__(
        self,
        max_size: int,
        max_wait_s: float,
        clock: Callable[[], float],
        weight: Callable[[T], int] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._weight = weight
        self._items: list[T] = []
        self._load = 0
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        return max(0, self._max_size - self._load)

    def add(self, item: T) -> None:
        if not self._items:
            self._opened_at = self._clock()
        self._items.append(item)
        self._load += 1 if self._weight is None else self._weight(item)

    def due(self) -> bool:
        if not self._items:
            return False
        return self._load >= self._max_size or self.wait_left() <= 0

    def wait_left(self) -> float:
        """Seconds until the open batch is due by age; ``max_wait_s`` when nothing is open."""
        if self._opened_at is None:
            return self._max_wait_s
        return max(0.0, self._opened_at + self._max_wait_s - self._clock())

    def take(self) -> list[T]:
        """Remove and return up to ``max_size`` (at least one item), oldest first."""
        if self._weight is None:
            n = min(self._max_size, len(self._items))
            taken = n
        else:
            n, taken = 0, 0
            for item in self._items:
                w = self._weight(item)
                if n and taken + w > self._max_size:
                    break
                n, taken = n + 1, taken + w
        batch, self._items = self._items[:n], self._items[n:]
        self._load -= taken
        self._opened_at = self._clock() if self._items else None
        return batch
