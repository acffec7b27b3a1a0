"""Assemble a sink from settings: the store, the Kafka clients, the health endpoint; run until stopped."""

from __future__ import annotations

import logging
import threading

from embedstream.allocator import return_large_buffers
from embedstream.collector import tune_collector
from embedstream.config import Settings
from embedstream.health import HealthServer
from embedstream.kafka_io import ensure_topics, make_member, make_sender
from embedstream.stores.base import Store
from embedstream.stores.registry import store_kind
from embedstream.stores.sink import SinkStats, StoreSink, sink_kafka

log = logging.getLogger(__name__)


def open_store(kind: str, settings: Settings) -> Store:
    return store_kind(kind).open(settings)


def create_sink(kind: str, settings: Settings) -> StoreSink:
    store = open_store(kind, settings)
    k = sink_kafka(settings, kind)
    try:
        ensure_topics(k, {k.dead_letter_topic: 1})
    except Exception as exc:  # a locked-down cluster creates topics itself; the first dead letter tells
        log.warning("could not make sure the dead-letter topic %s exists: %s", k.dead_letter_topic, exc)
    client_id = f"{k.client_id}-sink-{kind}-{settings.worker_id}"
    # The consumer keeps `delivery`, so behind exactly-once workers it reads committed rows only; dead
    # letters are plain idempotent sends, never in a transaction.
    plain = k.model_copy(update={"delivery": "at_least_once"})
    return StoreSink(settings, store, make_member(k, client_id), make_sender(plain, client_id))


def run_sink(kind: str, settings: Settings, stop: threading.Event) -> SinkStats:
    return_large_buffers()  # before the first message: see allocator.py
    sink = create_sink(kind, settings)
    tune_collector()  # start-up done: see collector.py
    health = None
    if settings.health_port is not None:
        health = HealthServer(settings.health_host, settings.health_port, sink.status).start()
        log.info("health endpoint on %s:%d (/healthz, /readyz, /metrics)", settings.health_host, health.port)
    try:
        return sink.run(stop)
    finally:
        if health is not None:
            health.stop()
        sink.close()
