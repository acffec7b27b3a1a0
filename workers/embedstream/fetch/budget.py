"""Bytes in flight: a fetch reserves the object's size before it reads the body and frees it once decoded."""

from __future__ import annotations

import threading


class ByteBudget:
    """A counting semaphore in bytes. A reservation is made once, whole, so two fetches never each hold part
    of the budget while waiting for the rest; one larger than the whole budget takes all of it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self.total - self._free

    def reserve(self, n: int) -> int:
        n = max(1, min(n, self.total))
        with self._cond:
            self._cond.wait_for(lambda: self._free >= n)
            self._free -= n
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()
