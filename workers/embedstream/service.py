"""Assemble a worker from settings: spec, modality, Triton backend (checked), Kafka clients."""

from __future__ import annotations

import logging
import threading

from embedstream.config import Settings
from embedstream.encoders import EncoderSpec, get_family
from embedstream.health import HealthServer
from embedstream.inference.triton import TritonBackend
from embedstream.kafka_io import make_consumer, make_producer
from embedstream.modalities import modality_for
from embedstream.worker import Worker, WorkerStats

log = logging.getLogger(__name__)


def encoder_spec(settings: Settings) -> EncoderSpec:
    return get_family(settings.encoder.family).describe(settings.encoder)


def create_worker(settings: Settings, ready_timeout_s: float = 120.0) -> Worker:
    spec = encoder_spec(settings)
    backend = TritonBackend(settings.triton, spec)
    backend.wait_ready(ready_timeout_s)
    backend.verify(settings.batch.max_size)
    client_id = f"{settings.kafka.client_id}-{settings.worker_id}"
    return Worker(
        settings,
        modality_for(spec, settings),
        backend,
        make_consumer(settings.kafka, client_id),
        make_producer(settings.kafka, client_id, settings.worker_id),
    )


def run_worker(settings: Settings, stop: threading.Event) -> WorkerStats:
    worker = create_worker(settings)
    health = None
    if settings.health_port is not None:
        health = HealthServer(settings.health_host, settings.health_port, worker.status).start()
        log.info("health endpoint on %s:%d (/healthz, /readyz)", settings.health_host, health.port)
    try:
        return worker.run(stop)
    finally:
        if health is not None:
            health.stop()
        worker.close()
