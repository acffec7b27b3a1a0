"""Every kafka-python client embedstream builds, from settings, and topic administration.

The worker's group member and producer, the group-less readers and plain writers of the operations
commands and local tools, and the admin client all start from ``KafkaSettings`` through
``client_kwargs``, so its SASL/TLS settings reach every connection.

With security on, the first client built from a set of settings first proves it can connect
(``check_connection``): kafka-python retries a refused login or an untrusted certificate quietly and
forever, so a wrong password would otherwise be a worker that hangs. The check fails within seconds
with ``KafkaSecurityError`` naming the cause.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from embedstream.config import KafkaSettings
from embedstream.consume.member import Member, Sender
from embedstream.errors import ConfigError

log = logging.getLogger(__name__)


class NoPartitions(ConfigError, TimeoutError):
    """A topic showed no partitions within the wait: to an operator a wrong topic name, to a tool a timeout."""


class KafkaSecurityError(ConfigError):
    """The broker refused the client's credentials or certificate, or TLS/SASL does not match the broker."""


CHECK_TIMEOUT_S = 10.0


def client_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """The kafka-python connection settings every client of ours gets: brokers, security protocol, SASL, TLS."""
    conf: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers, "security_protocol": k.security_protocol}
    if k.security_protocol.startswith("SASL_"):
        conf["sasl_mechanism"] = k.sasl_mechanism
        conf["sasl_plain_username"] = k.sasl_username
        conf["sasl_plain_password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    if k.security_protocol in ("SSL", "SASL_SSL"):
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(k, name)
            if value is not None:
                conf[name] = str(value)
    return conf


def _check_key(k: KafkaSettings) -> str:
    conf = client_kwargs(k)
    password = conf.pop("sasl_plain_password", None) or ""
    return repr(sorted(conf.items())) + hashlib.sha256(password.encode()).hexdigest()


_checked: set[str] = set()
_checked_lock = threading.Lock()


def _secured(k: KafkaSettings) -> None:
    """Run ``check_connection`` once per process and settings when security is on; plaintext is not probed."""
    if k.security_protocol == "PLAINTEXT":
        return
    key = _check_key(k)
    with _checked_lock:
        if key in _checked:
            return
    check_connection(k)
    with _checked_lock:
        _checked.add(key)


class _Failures(logging.Handler):
    """Collects what one check's kafka-python threads log about failed connection attempts (kafka-python
    retries them and says no more); records of other clients' threads are not this check's."""

    def __init__(self, threads: set[str]) -> None:
        super().__init__(logging.DEBUG)
        self.threads = threads
        self.texts: list[str] = []
        self.fatal = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName not in self.threads:
            return
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return
        if record.levelno >= logging.WARNING or "Sasl" in text or "SSL" in text:
            self.texts.append(text)
            if _diagnose_text(text) is not None:
                self.fatal.set()


_check_ids = itertools.count()


def _diagnose_text(text: str) -> str | None:
    """The cause a connection attempt's error names, when it is one that retrying cannot fix."""
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return "tls-untrusted"
    if "SaslAuthenticationFailed" in text or "Authentication failed" in text:
        return "sasl-refused"
    if "UnsupportedSaslMechanism" in text or ("does not support" in text and "sasl mechanism" in text):
        return "sasl-mechanism"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "UNKNOWN_PROTOCOL" in text:
        return "tls-mismatch"
    if "TLSV1_ALERT" in text or "SSLV3_ALERT" in text or "alert certificate required" in text:
        return "tls-alert"
    return None


def _explain(k: KafkaSettings, cause: str, detail: str) -> str:
    who = f"user {k.sasl_username!r} with {k.sasl_mechanism}"
    brokers = k.bootstrap_servers
    match cause:
        case "tls-untrusted":
            trust = f"ssl_cafile {k.ssl_cafile}" if k.ssl_cafile else "the system CA store (ssl_cafile is unset)"
            return (
                f"Kafka TLS: the certificate of {brokers} is not trusted by {trust} (or does not name the host): "
                f"{detail}"
            )
        case "sasl-refused":
            return (
                f"Kafka SASL authentication failed for {who} at {brokers}: wrong kafka.sasl_username or "
                f"kafka.sasl_password, or the user has no {k.sasl_mechanism} credentials on the broker ({detail})"
            )
        case "sasl-mechanism":
            return f"Kafka SASL: {brokers} does not offer {k.sasl_mechanism} (kafka.sasl_mechanism): {detail}"
        case "tls-mismatch":
            return (
                f"Kafka TLS: {brokers} does not speak TLS on this port, or speaks it differently "
                f"(kafka.security_protocol={k.security_protocol}): {detail}"
            )
        case "tls-alert":
            return (
                f"Kafka TLS: {brokers} refused the TLS handshake (a client certificate missing or not trusted? "
                f"kafka.ssl_certfile / ssl_keyfile): {detail}"
            )
    hint = ""
    if k.security_protocol in ("SSL", "SASL_SSL") and k.ssl_certfile is None:
        hint = " If the brokers require client certificates (mutual TLS), set kafka.ssl_certfile and ssl_keyfile."
    return (
        f"Kafka: no usable connection to {brokers} within the check: is a broker there, and does "
        f"kafka.security_protocol={k.security_protocol} match its listener (TLS needs SSL or SASL_SSL)?{hint} {detail}"
    )


def check_connection(k: KafkaSettings, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Connect once, as every client will, and fetch metadata; raise ``KafkaSecurityError`` naming the cause.

    Returns as soon as metadata came back, and raises as soon as kafka-python reports a refused login,
    an untrusted certificate or a TLS mismatch (at most ``timeout_s`` when nothing answers at all).
    The message never contains the password.
    """
    if k.security_protocol.startswith("SASL_"):
        missing = [n for n in ("sasl_mechanism", "sasl_username", "sasl_password") if not getattr(k, n)]
        if missing:
            raise KafkaSecurityError(
                f"kafka.security_protocol={k.security_protocol} needs "
                + ", ".join(f"kafka.{n}" for n in missing)
                + " (for the password, e.g. EMBEDSTREAM_KAFKA__SASL_PASSWORD)"
            )
    client_id = f"{k.client_id}-check-{next(_check_ids)}"
    thread = f"kafka-connection-check-{client_id}"
    failures = _Failures({thread, f"kafka-io-{client_id}"})
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(failures)
    previous = kafka_log.level
    if kafka_log.getEffectiveLevel() > logging.WARNING:
        kafka_log.setLevel(logging.WARNING)
    outcome: list[BaseException | None] = []
    done = threading.Event()
    net_clients: list[Any] = []

    def net_client(**configs: Any) -> Any:  # kept, to stop its retries once the answer is known
        net_clients.append(KafkaAdminClient.DEFAULT_CONFIG["kafka_client"](**configs))
        return net_clients[-1]

    def attempt() -> None:
        try:
            admin = KafkaAdminClient(
                **client_kwargs(k),
                client_id=client_id,
                kafka_client=net_client,
                bootstrap_timeout_ms=int(timeout_s * 1000),
                request_timeout_ms=int(timeout_s * 1000),
                reconnect_backoff_max_ms=1000,
            )
            try:
                admin.list_topics()
            finally:
                admin.close()
            outcome.append(None)
        except BaseException as exc:  # reported below
            outcome.append(exc)
        finally:
            done.set()

    try:
        threading.Thread(target=attempt, name=thread, daemon=True).start()
        deadline = time.monotonic() + timeout_s + 2
        while not done.is_set() and not failures.fatal.is_set() and time.monotonic() < deadline:
            done.wait(0.05)
        if not done.is_set():
            for client in net_clients:
                try:
                    client.close()
                except Exception as exc:  # stopping retries is best effort
                    log.debug("stopping the connection check's client: %s", exc)
            done.wait(2)
    finally:
        kafka_log.removeHandler(failures)
        kafka_log.setLevel(previous)
    if outcome and outcome[0] is None:
        return
    texts = list(failures.texts)
    for text in reversed(texts):
        cause = _diagnose_text(text)
        if cause is not None:
            raise KafkaSecurityError(_explain(k, cause, _scrub(text, k)))
    last = _scrub(str(outcome[0]) if outcome and outcome[0] else (texts[-1] if texts else "no answer"), k)
    raise KafkaSecurityError(_explain(k, "unknown", f"{last} after {timeout_s:.0f}s"))


def _scrub(text: str, k: KafkaSettings) -> str:
    password = k.sasl_password.get_secret_value() if k.sasl_password else ""
    return text.replace(password, "***") if password else text


def _named(client_id: str | None) -> dict[str, Any]:
    # None keeps the client's own default id rather than sending an empty one.
    return {} if client_id is None else {"client_id": client_id}


def make_consumer(k: KafkaSettings, client_id: str) -> KafkaConsumer:
    """The worker's member of its consumer group: offsets committed by the worker, never automatically."""
    _secured(k)
    return KafkaConsumer(
        isolation_level="read_committed" if k.delivery == "exactly_once" else "read_uncommitted",
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
        **client_kwargs(k),
    )


def make_member(k: KafkaSettings, client_id: str) -> Member:
    """The consume loop's group member on the client ``kafka.client`` names (``make_consumer`` for kafka-python)."""
    if k.client == "kafka-python":
        return make_consumer(k, client_id)
    _secured(k)
    return _librdkafka().LoopConsumer(k, client_id)


def make_sender(k: KafkaSettings, client_id: str, worker_id: str = "") -> Sender:
    """The consume loop's producer on the client ``kafka.client`` names (``make_producer`` for kafka-python)."""
    if k.client == "kafka-python":
        return make_producer(k, client_id, worker_id)
    _secured(k)
    return _librdkafka().LoopProducer(k, client_id, worker_id)


def _librdkafka() -> Any:
    try:
        from embedstream import kafka_librdkafka
    except ImportError as exc:
        raise ConfigError(
            f"kafka.client=librdkafka needs confluent-kafka: pip install 'embedstream[librdkafka]' ({exc})"
        ) from exc
    return kafka_librdkafka


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
    _secured(k)
    return KafkaConsumer(
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        **_named(client_id),
        **fetch,
        **client_kwargs(k),
    )


def make_producer(k: KafkaSettings, client_id: str, worker_id: str = "") -> KafkaProducer:
    """The worker's producer: acks=all, idempotent, transactional under exactly-once delivery."""
    transactional: dict[str, Any] = {}
    if k.delivery == "exactly_once":
        transactional = {
            "transactional_id": k.transactional_id or f"{k.group_id}-{worker_id}",
            "transaction_timeout_ms": k.transaction_timeout_ms,
        }
    _secured(k)
    return KafkaProducer(
        **transactional,
        client_id=client_id,
        acks="all",
        linger_ms=k.producer_linger_ms,
        batch_size=k.producer_batch_bytes,
        compression_type=None if k.producer_compression == "none" else k.producer_compression,
        max_request_size=k.producer_max_request_bytes,
        # Idempotence keeps broker-side retries from writing the same embedding twice.
        enable_idempotence=True,
        **client_kwargs(k),
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
    _secured(k)
    return KafkaProducer(
        acks="all",
        linger_ms=k.producer_linger_ms if linger_ms is None else linger_ms,
        batch_size=k.producer_batch_bytes,
        max_request_size=k.producer_max_request_bytes if max_request_size is None else max_request_size,
        **extra,
        **client_kwargs(k),
    )


def make_admin(k: KafkaSettings, *, request_timeout_ms: int | None = None) -> KafkaAdminClient:
    extra: dict[str, Any] = {} if request_timeout_ms is None else {"request_timeout_ms": request_timeout_ms}
    _secured(k)
    return KafkaAdminClient(**extra, **client_kwargs(k))


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
