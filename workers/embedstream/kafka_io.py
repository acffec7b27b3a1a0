"""Every kafka-python client embedstream builds, from settings, and topic administration.

The worker's group member and producer, the group-less readers and plain writers of the operations
commands and local tools, and the admin client all start from ``KafkaSettings``, so its SASL/TLS
settings reach every connection.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from embedstream.config import KafkaSettings
from embedstream.errors import ConfigError

log = logging.getLogger(__name__)


class NoPartitions(ConfigError, TimeoutError):
    """A topic showed no partitions within the wait: to an operator a wrong topic name, to a tool a timeout."""


def _security(k: KafkaSettings) -> dict[str, Any]:
    conf: dict[str, Any] = {"security_protocol": k.security_protocol}
    if k.sasl_mechanism:
        conf["sasl_mechanism"] = k.sasl_mechanism
        conf["sasl_plain_username"] = k.sasl_username
        conf["sasl_plain_password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(k, name)
        if value is not None:
            conf[name] = str(value)
    return conf


def _named(client_id: str | None) -> dict[str, Any]:
    # None keeps the client's own default id rather than sending an empty one.
    return {} if client_id is None else {"client_id": client_id}


def make_consumer(k: KafkaSettings, client_id: str) -> KafkaConsumer:
    """The worker's member of its consumer group: offsets committed by the worker, never automatically."""
    return KafkaConsumer(
        isolation_level="read_committed" if k.delivery == "exactly_once" else "read_uncommitted",
        bootstrap_servers=k.bootstrap_servers,
        group_id=k.group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_interval_ms=k.max_poll_interval_ms,
        fetch_max_bytes=k.fetch_max_bytes,
        fetch_max_wait_ms=k.fetch_max_wait_ms,
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        **_security(k),
    )


def make_reader(
    k: KafkaSettings,
    *,
    client_id: str | None = None,
    auto_offset_reset: Literal["earliest", "latest"] = "latest",
    read_committed: bool = False,
    settings_fetch_sizes: bool = True,
) -> KafkaConsumer:
    """A consumer outside any group, for ``assign`` + ``seek``: it never takes partitions from, or commits
    for, a worker group, so it can run beside live workers.

    ``settings_fetch_sizes`` fetches with the settings' byte limits (as the worker does); off, with
    kafka-python's defaults.
    """
    fetch: dict[str, Any] = {}
    if settings_fetch_sizes:
        fetch = {"fetch_max_bytes": k.fetch_max_bytes, "max_partition_fetch_bytes": k.max_partition_fetch_bytes}
    return KafkaConsumer(
        bootstrap_servers=k.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        **_named(client_id),
        **fetch,
        **_security(k),
    )


def make_producer(k: KafkaSettings, client_id: str, worker_id: str = "") -> KafkaProducer:
    """The worker's producer: acks=all, idempotent, transactional under exactly-once delivery."""
    transactional: dict[str, Any] = {}
    if k.delivery == "exactly_once":
        transactional = {
            "transactional_id": k.transactional_id or f"{k.group_id}-{worker_id}",
            "transaction_timeout_ms": k.transaction_timeout_ms,
        }
    return KafkaProducer(
        **transactional,
        bootstrap_servers=k.bootstrap_servers,
        client_id=client_id,
        acks="all",
        linger_ms=k.producer_linger_ms,
        batch_size=k.producer_batch_bytes,
        compression_type=None if k.producer_compression == "none" else k.producer_compression,
        max_request_size=k.producer_max_request_bytes,
        # Idempotence keeps broker-side retries from writing the same embedding twice.
        enable_idempotence=True,
        **_security(k),
    )


def make_writer(
    k: KafkaSettings,
    *,
    client_id: str | None = None,
    linger_ms: int | None = None,
    max_request_size: int | None = None,
    enable_idempotence: bool | None = None,
) -> KafkaProducer:
    """A plain producer (acks=all, no transactions) for the operations commands and local tools.

    ``linger_ms`` and ``max_request_size`` default to the settings' producer values;
    ``enable_idempotence`` None keeps kafka-python's default. Record batches are the settings'
    ``producer_batch_bytes`` (1 MiB), as the worker's: on a broker that stores in S3 every batch is
    an object write, and the client's 16 KiB default held a writer to ~700 messages/s there.
    """
    extra: dict[str, Any] = _named(client_id)
    if enable_idempotence is not None:
        extra["enable_idempotence"] = enable_idempotence
    return KafkaProducer(
        bootstrap_servers=k.bootstrap_servers,
        acks="all",
        linger_ms=k.producer_linger_ms if linger_ms is None else linger_ms,
        batch_size=k.producer_batch_bytes,
        max_request_size=k.producer_max_request_bytes if max_request_size is None else max_request_size,
        **extra,
        **_security(k),
    )


def make_admin(k: KafkaSettings, *, request_timeout_ms: int | None = None) -> KafkaAdminClient:
    extra: dict[str, Any] = {} if request_timeout_ms is None else {"request_timeout_ms": request_timeout_ms}
    return KafkaAdminClient(bootstrap_servers=k.bootstrap_servers, **extra, **_security(k))


def partitions_of(consumer: KafkaConsumer, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The topic's partition numbers, sorted; raises NoPartitions when none show up within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            raise NoPartitions(f"topic {topic!r} does not exist or has no partitions")
        # Metadata for a topic this client has not asked about yet arrives after a refresh.
        time.sleep(0.2)


def ensure_topics(k: KafkaSettings, topics: dict[str, int]) -> None:
    """Create the topics that do not exist yet (name -> partition count)."""
    admin = make_admin(k)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", [t.name for t in new])
    finally:
        admin.close()
