"""What plugs into the consume loop: decode a poll, process a batch, publish what it made.

The loop (consume.loop) owns everything around it: polling, batching, holding through outages,
dead letters, finished offsets, commits, rebalances, status. A stage is the part that differs:

- the embedding worker (``worker.EmbedStage``): decode with the modality, infer on Triton,
  publish Arrow rows to the output topic (their acks finish the offsets);
- a store sink (``stores.sink.StoreStage``): decode Arrow messages, upsert them into a store,
  finish the offsets once the store acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from kafka.structs import TopicPartition

from embedstream.consume.outbox import Covers, Outbox
from embedstream.records import BadRecord, SourceMessage


@dataclass
class Processed:
    """One batch back from the stage: the parts it processed with their outputs, the items it refused
    (with why), and the items it could not get ready, as dead letters."""

    ok: list[tuple[list[Any], dict[str, np.ndarray]]] = field(default_factory=list)
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    unprepared: list[BadRecord] = field(default_factory=list)


class Stage(Protocol):
    name: str
    """The label of the loop's metrics: the modality or the store."""

    def decode_many(self, msgs: Sequence[SourceMessage]) -> Sequence[Any]:
        """One result per message, in order: an item to batch, a BadRecord or a Deferred."""

    def batch_weight(self, item: Any) -> int:
        """How much of ``max_size`` an item takes (1 a message for the worker, rows for a store)."""

    def connect(self) -> None:
        """On each processing thread, before the loop joins its group; raises what a connection raised."""

    def process(self, batch: list[Any]) -> Processed:
        """On a processing thread. Raises BackendError(retriable) or StoreUnavailable when it is away."""

    def ready(self) -> bool:
        """The outage probe: can the stage take work again?"""

    def publish(self, outbox: Outbox, part: list[Any], outputs: dict[str, np.ndarray]) -> int:
        """On the loop's thread: send or finish what a processed part made; returns messages sent."""

    def rejected(self, item: Any, why: str) -> BadRecord:
        """The dead letter of an item the stage refused for good."""

    def covers(self, item: Any) -> Covers:
        """The input offsets an item stands for."""

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Drop state of partitions the loop no longer owns."""

    def close(self) -> None:
        """Release connections."""
