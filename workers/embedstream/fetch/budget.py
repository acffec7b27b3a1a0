"""Bytes in flight: a fetch reserves the object's size before it reads the body and frees it once decoded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from embedstream.fetch.outcomes import Final, Retry

CHUNK = 64 * 1024  # what a source reads at a time, so the byte cap and the deadline are checked as it streams


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


def read_capped(chunks: Iterable[bytes], uri: str, cap: int, deadline: float) -> bytes:
    """An object's body from its chunks: ``fetch_too_large`` as soon as more than ``cap`` bytes arrived
    (never after reading it all), a timed-out Retry once ``deadline`` (monotonic) passed."""
    parts: list[bytes] = []
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > cap:
            raise Final("fetch_too_large", f"{uri}: more than fetch.max_object_bytes {cap} bytes")
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise Retry(f"{uri}: not complete within fetch.timeout_s", timeout=True)
    return b"".join(parts)
