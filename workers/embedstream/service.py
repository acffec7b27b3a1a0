"""Assemble a worker from settings: the served model's spec, modality, Triton backend (checked), Kafka clients.

The worker computes only the served model's name (``encoders.served_model_name``, torch-free) and reads
the encoder spec from the model Triton serves, so a worker process never imports torch, timm or
transformers: those belong to the exporter (``embedstream export-models``), which wrote the spec.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from embedstream.allocator import return_large_buffers
from embedstream.collector import tune_collector
from embedstream.config import Settings
from embedstream.encoders import served_model_name
from embedstream.health import HealthServer
from embedstream.inference.triton import TritonBackend
from embedstream.kafka_io import make_member, make_sender
from embedstream.modalities import modality_for
from embedstream.worker import Worker, WorkerStats

if TYPE_CHECKING:
    from embedstream.encoders import EncoderSpec

log = logging.getLogger(__name__)


def encoder_spec(settings: Settings) -> EncoderSpec:
    """The spec the family computes in-process, for the local tools that run models themselves.

    This imports the family's network library on first use; ``create_worker`` does not call it.
    """
    from embedstream.encoders import describe

    return describe(settings)


def create_worker(settings: Settings, ready_timeout_s: float = 120.0) -> Worker:
    backend = TritonBackend.for_served_model(settings.triton, served_model_name(settings.encoder), ready_timeout_s)
    try:
        backend.verify(settings.batch.max_size, settings.encoder)
        modality = modality_for(backend.spec, settings)
    except BaseException:
        backend.close()
        raise
    client_id = f"{settings.kafka.client_id}-{settings.worker_id}"
    return Worker(
        settings,
        modality,
        backend,
        make_member(settings.kafka, client_id),
        make_sender(settings.kafka, client_id, settings.worker_id),
    )


def run_worker(settings: Settings, stop: threading.Event) -> WorkerStats:
    return_large_buffers()  # before the first message: see allocator.py
    worker = create_worker(settings)
    tune_collector()  # start-up done: see collector.py
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
