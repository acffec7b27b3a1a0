"""In-memory stand-ins for the Kafka clients and the inference server, for fast tests of the worker loop.

They model only what the worker relies on (poll/commit/send/flush and acknowledgements); the
integration tier runs the same loop against the real broker and Triton.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedstream.encoders import EncoderSpec
from embedstream.errors import BackendError


def call_listener(method: Any, partitions: list[TopicPartition]) -> None:
    """Call a rebalance-listener method as kafka-python does: a coroutine is driven to its end.

    What it awaits are kafka-python Futures, resolved by other threads: wait for each, then resume.
    """
    result = method(partitions)
    if not inspect.iscoroutine(result):
        return
    try:
        awaited = result.send(None)
        while True:
            while not awaited.is_done:
                time.sleep(0.001)
            awaited = result.send(None)
    except StopIteration:
        return


class FakeConsumer:
    """Serves pre-loaded records from one topic's partitions, ``max_records`` at a time."""

    def __init__(self, records: dict[int, list[tuple[bytes | None, bytes]]], topic: str = "images") -> None:
        self.topic = topic
        self._queues = {
            p: [
                SimpleNamespace(topic=topic, partition=p, offset=o, key=k, value=v, timestamp=1_000 + o, headers=[])
                for o, (k, v) in enumerate(msgs)
            ]
            for p, msgs in records.items()
        }
        self._ends = {p: len(msgs) for p, msgs in records.items()}
        self._all = {p: list(queue) for p, queue in self._queues.items()}  # what seek() serves again
        self.committed: dict[TopicPartition, int] = {}
        self.commit_calls: list[dict[TopicPartition, int]] = []
        self.listener: Any = None
        self.closed = False
        self.paused_partitions: set[TopicPartition] = set()

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self.listener = listener
        if listener is not None:
            call_listener(listener.on_partitions_assigned, [TopicPartition(self.topic, p) for p in self._queues])

    def start_at(self, partition: int, offset: int) -> None:
        """Serve the partition from ``offset`` on, as after a restart from a committed offset."""
        self._queues[partition] = [rec for rec in self._queues[partition] if rec.offset >= offset]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Serve the partition again from ``offset``, as the real consumer's next fetch does."""
        self._queues[tp.partition] = [rec for rec in self._all[tp.partition] if rec.offset >= offset]

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._ends.get(tp.partition)

    def position(self, tp: TopicPartition) -> int:
        queue = self._queues.get(tp.partition, [])
        return queue[0].offset if queue else self._ends.get(tp.partition, 0)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, p) for p in self._queues}

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_partitions)

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        budget = max_records or 500
        out: dict[TopicPartition, list[Any]] = {}
        for p, queue in self._queues.items():
            if budget <= 0:
                break
            if TopicPartition(self.topic, p) in self.paused_partitions:
                continue
            take, self._queues[p] = queue[:budget], queue[budget:]
            if take:
                out[TopicPartition(self.topic, p)] = take
                budget -= len(take)
        return out

    def drained(self) -> bool:
        return not any(self._queues.values())

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        plain = {tp: om.offset for tp, om in offsets.items()}
        self.commit_calls.append(plain)
        self.committed.update(plain)

    def close(self, autocommit: bool = False) -> None:
        self.closed = True


@dataclass
class _Future:
    is_done: bool = False
    exception: Exception | None = None

    def failed(self) -> bool:
        return self.exception is not None


@dataclass
class FakeProducer:
    """Records sends; acknowledges them on ``flush`` (or at once with ``ack_immediately``)."""

    ack_immediately: bool = False
    fail_topics: set[str] = field(default_factory=set)
    sent: dict[str, list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    _unacked: list[tuple[str, _Future]] = field(default_factory=list)

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> _Future:
        fut = _Future()
        self.sent[topic].append((key, value, list(headers or [])))
        self._unacked.append((topic, fut))
        if self.ack_immediately:
            self.flush()
        return fut

    def flush(self, timeout: float | None = None) -> None:
        for topic, fut in self._unacked:
            if topic in self.fail_topics:
                fut.exception = RuntimeError(f"broker refused a write to {topic}")
            fut.is_done = True
        self._unacked = []

    def close(self, timeout: float | None = None) -> None:
        self.flush()

    # -- transactions: records what each committed transaction carried --------------------------------

    def init_transactions(self) -> None:
        self.transactions: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None

    def begin_transaction(self) -> None:
        self._open = {"sends": sum(len(v) for v in self.sent.values()), "offsets": {}, "group": None}

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, OffsetAndMetadata], group_id: str) -> None:
        if self._open is None:
            raise RuntimeError("no transaction in progress")
        self._open["offsets"] = {tp: om.offset for tp, om in offsets.items()}
        self._open["group"] = group_id

    def commit_transaction(self) -> None:
        if self._open is None:
            raise RuntimeError("no transaction in progress")
        self.flush()
        total = sum(len(v) for v in self.sent.values())
        self.transactions.append({**self._open, "sends": total - self._open["sends"]})
        self._open = None


class FakeBackend:
    """Deterministic embeddings (per-channel means, repeated), and it can refuse chosen inputs like Triton."""

    def __init__(self, spec: EncoderSpec, poison_value: int | None = None) -> None:
        self.spec = spec
        self.poison_value = poison_value
        self.calls: list[int] = []
        self.down = False  # while True every call fails as if the server were unreachable

    def verify(self, batch_size: int) -> None:
        return None

    def infer(self, inputs: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        pixels = inputs[0]
        self.calls.append(len(pixels))
        if self.down:
            raise BackendError("UNAVAILABLE: connection refused", retriable=True)
        if self.poison_value is not None and (pixels == self.poison_value).all(axis=(1, 2, 3)).any():
            raise BackendError("INVALID_ARG: model refused an input", retriable=False)
        means = pixels.reshape(len(pixels), -1, 3).mean(axis=1).astype(np.float32)
        reps = -(-self.spec.embedding_dim // 3)
        return {self.spec.embedding_output.name: np.tile(means, reps)[:, : self.spec.embedding_dim]}

    def connect(self) -> None:
        return None

    def ready(self) -> bool:
        return not self.down

    def close(self) -> None:
        return None
