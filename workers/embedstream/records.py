"""The values that travel between the steps: a source message, a decoded item, or a bad record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# Stable, machine-readable dead-letter reasons (schemas/dead-letter.json lists the same set).
Reason = Literal[
    "empty",
    "oversize",
    "invalid_envelope",
    "undecodable",
    "unsupported_format",
    "decompression_bomb",
    "inference_rejected",
    "unknown_model",
    "invalid_utf8",
    # time series (schemas/timeseries-*.schema.json)
    "invalid_timeseries",
    "non_finite",
    "wrong_shape",
    "late",
    "evicted",
]
REASONS: tuple[str, ...] = Reason.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SourceMessage:
    """A consumed Kafka message, reduced to what the pipeline needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(frozen=True)
class DecodedImage:
    """Pixels ready for the model (uint8, H x W x 3) and where they came from."""

    source: SourceMessage
    id: str
    event_time_ms: int
    pixels: np.ndarray = field(repr=False)
    source_width: int
    source_height: int


@dataclass(frozen=True)
class BadRecord:
    """A message that cannot be embedded; it goes to the dead-letter topic, never up the stack."""

    source: SourceMessage
    reason: Reason
    message: str
    error_class: str = "ValueError"
