"""What the operations commands need beside the topic reader (``embedstream.topic_reader``): times on the
command line, headers, and sends with a bounded number unacknowledged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kafka import KafkaProducer

from embedstream.errors import ConfigError


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (naive means UTC), as epoch milliseconds."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"not a time: {text!r} (use ISO 8601, e.g. 2024-05-01T12:00:00Z, or epoch ms)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def header_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, bytes]:
    return {k: v for k, v in headers or []}


class AckedSender:
    """Sends with a bounded number of unacknowledged messages; raises on the first failed send."""

    def __init__(self, producer: KafkaProducer, window: int = 500) -> None:
        self._producer, self._window = producer, window
        self._futures: list[Any] = []
        self.acked = 0

    def send(self, **message: Any) -> int:
        """Queue one message; returns how many were newly acknowledged (for progress)."""
        self._futures.append(self._producer.send(**message))
        return self.drain() if len(self._futures) >= self._window else 0

    def drain(self) -> int:
        self._producer.flush()
        for future in self._futures:
            future.get(timeout=30)
        done, self._futures = len(self._futures), []
        self.acked += done
        return done
