"""librdkafka (confluent-kafka) as the consume loop's Kafka client, selected by ``kafka.client``.

kafka-python parses every fetched record and builds every produce request in Python, on the
worker's own thread: at tens of microseconds a message that is the floor of a stream of small
messages (a time-series window, a sentence). librdkafka fetches, parses and produces in C threads
of its own, so the worker's thread only walks the messages it is handed.

``LoopConsumer`` and ``LoopProducer`` offer the part of kafka-python's ``KafkaConsumer`` and
``KafkaProducer`` the loop uses (``consume.loop``, ``consume.outbox``, ``consume.delivery``), with
kafka-python's ``TopicPartition`` and ``OffsetAndMetadata`` at their edges, so the loop, its offset
bookkeeping and its delivery modes are the same code on either client. What differs:

* A rebalance runs the loop's steps inside ``consume()`` on the worker's own thread, where
  librdkafka allows the drain's blocking commit; there is no IO thread to step around.
* A send's acknowledgement arrives in a delivery callback, served when the producer is polled: a
  pending send's ``is_done`` polls it.
* An exactly-once transaction names the group by the consumer's group metadata, not its id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as RdPartition
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedstream.config import KafkaSettings
from embedstream.consume.rebalance import RebalanceSteps
from embedstream.records import SourceMessage

log = logging.getLogger("embedstream.librdkafka")
FETCH_QUEUE_BACKOFF_MS = 20


def rd_config(k: KafkaSettings, client_id: str) -> dict[str, Any]:
    """The connection settings of ``kafka_io.client_kwargs`` in librdkafka's names."""
    conf: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "security.protocol": k.security_protocol.lower(),
        "client.id": client_id,
        "logger": log,
        "error_cb": _log_error,
        # As kafka-python does (TCP_NODELAY): Nagle's algorithm holds a small request back until the
        # previous one is acknowledged, which with delayed ACKs adds tens of milliseconds to a fetch.
        "socket.nagle.disable": True,
    }
    if k.security_protocol.startswith("SASL_"):
        conf["sasl.mechanisms"] = k.sasl_mechanism
        conf["sasl.username"] = k.sasl_username
        conf["sasl.password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        value = getattr(k, ours)
        if k.security_protocol in ("SSL", "SASL_SSL") and value is not None:
            conf[theirs] = str(value)
    return conf


def _log_error(err: KafkaError) -> None:
    # librdkafka retries what it can by itself (a broker down, a connection reset); a fatal error
    # is raised by the next call instead.
    log.warning("librdkafka: %s", err)


def _ours(parts: Iterable[RdPartition]) -> list[TopicPartition]:
    return [TopicPartition(p.topic, p.partition) for p in parts]


def _theirs(parts: Iterable[TopicPartition]) -> list[RdPartition]:
    return [RdPartition(tp.topic, tp.partition) for tp in parts]


def _rd_offsets(offsets: dict[TopicPartition, OffsetAndMetadata]) -> list[RdPartition]:
    return [RdPartition(tp.topic, tp.partition, om.offset) for tp, om in offsets.items()]


def _headers(headers: Any) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, value or b"") for name, value in headers)


class LoopConsumer:
    """A group member on librdkafka with the kafka-python calls the consume loop makes."""

    def __init__(self, k: KafkaSettings, client_id: str) -> None:
        self._consumer = Consumer(
            {
                **rd_config(k, client_id),
                "group.id": k.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": k.auto_offset_reset,
                "isolation.level": "read_committed" if k.delivery == "exactly_once" else "read_uncommitted",
                "session.timeout.ms": k.session_timeout_ms,
                "heartbeat.interval.ms": k.heartbeat_interval_ms,
                "max.poll.interval.ms": k.max_poll_interval_ms,
                "fetch.max.bytes": k.fetch_max_bytes,
                "receive.message.max.bytes": k.fetch_max_bytes + 1_048_576,
                "fetch.wait.max.ms": k.fetch_max_wait_ms,
                "max.partition.fetch.bytes": k.max_partition_fetch_bytes,
                # librdkafka prefetches per partition ahead of the loop; bounded by the same bytes a
                # kafka-python fetch may hold, so a paused or slow worker does not buffer 64 MiB a partition.
                "queued.max.messages.kbytes": max(1024, k.fetch_max_bytes // 1024),
                # Once that queue is full, librdkafka waits this long before it fetches again (its
                # default: 1 s). A worker that drains the queue in about a second (time-series windows
                # at ~25,000/s) then sat in poll for part of every such second: 25,200 -> 34,000-37,000 windows/s.
                "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
            }
        )
        self._paused: set[TopicPartition] = set()
        self._steps: RebalanceSteps | None = None

    # -- group membership ---------------------------------------------------------------------------

    def subscribe(self, topics: list[str], steps: RebalanceSteps) -> None:
        self._steps = steps
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _on_assign(self, consumer: Consumer, parts: list[RdPartition]) -> None:
        # Assigned before the step runs, so the step may pause the partitions (an outage still on).
        consumer.assign(parts)
        assert self._steps is not None
        log.info("partitions assigned: %s", sorted(_ours(parts)))
        self._steps.on_assigned(_ours(parts))

    def _on_revoke(self, consumer: Consumer, parts: list[RdPartition]) -> None:
        assert self._steps is not None
        revoked = _ours(parts)
        log.info("partitions revoked: %s", sorted(revoked))
        try:
            self._steps.on_revoked(revoked)
        except KafkaException as exc:
            # The drain's commit was refused (the group moved on): those offsets are re-read by the new owner.
            log.warning("commit on revoke failed (%s); the partitions' new owner re-reads from the last commit", exc)
        finally:
            self._paused.difference_update(revoked)
            consumer.unassign()

    def _on_lost(self, consumer: Consumer, parts: list[RdPartition]) -> None:
        log.warning("partitions lost (the group went on without this member): %s", sorted(_ours(parts)))
        self._on_revoke(consumer, parts)

    # -- reading ------------------------------------------------------------------------------------

    def poll_messages(self, timeout_ms: int, max_records: int) -> list[SourceMessage]:
        """Up to ``max_records`` messages as SourceMessages; errors librdkafka reports in-band are logged.

        What has arrived, at once; waits up to ``timeout_ms`` only when nothing has, as kafka-python's
        ``poll`` does. ``consume(n, timeout)`` would wait until n messages arrived, so a light stream
        would sit in the consumer for the whole timeout on top of the batch's own wait.
        """
        got = self._consumer.consume(num_messages=max_records, timeout=0)
        if not got:
            first = self._consumer.poll(timeout_ms / 1000)
            if first is None:
                return []
            got = [first]
            if max_records > 1:
                got += self._consumer.consume(num_messages=max_records - 1, timeout=0)
        out: list[SourceMessage] = []
        now_ms = 0
        for m in got:
            if m.error() is not None:
                self._in_band_error(m)
                continue
            ts = m.timestamp()[1]
            if ts <= 0:
                now_ms = now_ms or int(time.time() * 1000)
                ts = now_ms
            headers = m.headers()
            out.append(
                SourceMessage(
                    m.topic(),  # type: ignore[arg-type]
                    m.partition(),  # type: ignore[arg-type]
                    m.offset(),  # type: ignore[arg-type]
                    m.key(),
                    m.value() or b"",
                    ts,
                    _headers(headers) if headers else (),
                )
            )
        return out

    @staticmethod
    def _in_band_error(m: Message) -> None:
        err = m.error()
        assert err is not None
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("librdkafka consume error on %s/%s: %s", m.topic(), m.partition(), err)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(RdPartition(tp.topic, tp.partition, offset))

    def pause(self, *parts: TopicPartition) -> None:
        if parts:
            self._consumer.pause(_theirs(parts))
            self._paused.update(parts)

    def resume(self, *parts: TopicPartition) -> None:
        if parts:
            self._consumer.resume(_theirs(parts))
            self._paused.difference_update(parts)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def assignment(self) -> set[TopicPartition]:
        return set(_ours(self._consumer.assignment()))

    # -- offsets ------------------------------------------------------------------------------------

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self._consumer.commit(offsets=_rd_offsets(offsets), asynchronous=False)

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end offset as last fetched (no broker round trip), as kafka-python's."""
        _low, high = self._consumer.get_watermark_offsets(RdPartition(tp.topic, tp.partition), cached=True)
        return high if high >= 0 else None

    def position(self, tp: TopicPartition) -> int:
        [got] = self._consumer.position([RdPartition(tp.topic, tp.partition)])
        return max(0, got.offset)

    def group_metadata(self) -> Any:
        """What a transaction names this member's group by (``send_offsets_to_transaction``)."""
        return self._consumer.consumer_group_metadata()

    def close(self, autocommit: bool = False) -> None:
        # enable.auto.commit is off: closing leaves the group without committing anything.
        self._consumer.close()


class _Sent:
    """A produce's outcome, as kafka-python's future shows it to the outbox."""

    __slots__ = ("_producer", "done", "exception")

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self.done = False
        self.exception: KafkaException | None = None

    def delivered(self, err: KafkaError | None, _msg: Message) -> None:
        self.exception = None if err is None else KafkaException(err)
        self.done = True

    @property
    def is_done(self) -> bool:
        if not self.done:
            self._producer.poll(0)  # serves delivery callbacks
        return self.done

    def failed(self) -> bool:
        return self.exception is not None


class LoopProducer:
    """The loop's producer on librdkafka: acks=all and idempotent, transactional under exactly-once."""

    def __init__(self, k: KafkaSettings, client_id: str, worker_id: str = "") -> None:
        conf = {
            **rd_config(k, client_id),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": k.producer_linger_ms,
            "batch.size": k.producer_batch_bytes,
            "compression.type": k.producer_compression,
            "message.max.bytes": k.producer_max_request_bytes,
        }
        if k.delivery == "exactly_once":
            conf["transactional.id"] = k.transactional_id or f"{k.group_id}-{worker_id}"
            conf["transaction.timeout.ms"] = k.transaction_timeout_ms
        self._producer = Producer(conf)
        self._timeout_s = k.transaction_timeout_ms / 1000

    def send(
        self, topic: str, value: bytes, key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None
    ) -> _Sent:
        sent = _Sent(self._producer)
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=sent.delivered)  # type: ignore[arg-type]
                return sent
            except BufferError:
                # The local queue is full (queue.buffering.max.*): wait for acks to make room.
                self._producer.poll(0.1)

    def flush(self, timeout: float | None = None) -> None:
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} messages not acknowledged within {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        try:
            self.flush(timeout)
        except KafkaTimeoutError as exc:
            log.warning("closing the producer: %s", exc)

    def init_transactions(self) -> None:
        self._producer.init_transactions(self._timeout_s)

    def begin_transaction(self) -> None:
        self._producer.begin_transaction()

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, OffsetAndMetadata], group: Any) -> None:
        """``group``: the consumer's ``group_metadata()``, which librdkafka takes instead of the group id."""
        self._producer.send_offsets_to_transaction(_rd_offsets(offsets), group, self._timeout_s)

    def commit_transaction(self) -> None:
        self._producer.commit_transaction(self._timeout_s)
