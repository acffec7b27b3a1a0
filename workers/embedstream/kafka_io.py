"""kafka-python clients built from settings, and topic administration."""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from embedstream.config import KafkaSettings

log = logging.getLogger(__name__)


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


def make_consumer(k: KafkaSettings, client_id: str) -> KafkaConsumer:
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


def make_producer(k: KafkaSettings, client_id: str, worker_id: str = "") -> KafkaProducer:
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


def ensure_topics(k: KafkaSettings, topics: dict[str, int]) -> None:
    """Create the topics that do not exist yet (name -> partition count)."""
    admin = KafkaAdminClient(bootstrap_servers=k.bootstrap_servers, **_security(k))
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
