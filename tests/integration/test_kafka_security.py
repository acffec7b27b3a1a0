"""Encrypted, authenticated Kafka on the real stack: a broker that demands TLS + SASL (SCRAM), a worker end to
end against it, the operations commands and the readback through the same settings; a wrong password and an
untrusted CA stop a worker within seconds naming the cause; no log holds the password or a payload.

The certificates are made here (a throwaway CA, a server certificate for 127.0.0.1, a second CA that
signed nothing the broker shows) with the openssl command line.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from embedstream.config import Settings, dump_toml
from embedstream.errors import RuntimeStartError
from embedstream.kafka_io import KafkaSecurityError, check_connection, ensure_topics, make_writer
from embedstream.local.samples.generated import samples
from embedstream.local.stack.broker import LocalBroker
from embedstream.local.stack.secure_front import BrokerSecurity
from embedstream.local.stack.worker_process import WorkerProcess
from tests.unit.test_ops import run_ops

from .helpers import accounting, read_until_complete

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line"),
]

USER = "embed-svc"
MARKER = b"PAYLOAD-MARKER-" + secrets.token_hex(6).encode()


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


def make_server_cert(d: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.pem", d / "server.ext"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca = make_ca(d, "test-ca")
    other_ca = make_ca(d, "untrusted-ca")
    cert, key = make_server_cert(d, ca)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "client.key", "-out", d / "client.csr",
             "-subj", "/CN=embedstream-client")  # fmt: skip
    _openssl("x509", "-req", "-in", d / "client.csr", "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", d / "client.pem", "-days", "2")  # fmt: skip
    password = "pw-" + secrets.token_urlsafe(12)
    security = BrokerSecurity(cert, key, {USER: password}, cafile=ca[0], mechanisms=("SCRAM-SHA-512", "SCRAM-SHA-256"))
    workdir = tmp_path_factory.mktemp("secure-broker")
    broker = LocalBroker(workdir, security=security).start()
    try:
        yield broker, password, other_ca[0], workdir, d
    finally:
        broker.stop()


def _settings(stack, broker: LocalBroker, name: str, **kafka) -> Settings:
    """The shared stack's worker settings (its Triton and model) on the secured broker, topics of our own."""
    secure = broker.client_settings(USER)
    connection = {n: getattr(secure, n) for n in ("bootstrap_servers", "security_protocol", "sasl_mechanism",
                                                  "sasl_username", "ssl_cafile")}  # fmt: skip
    base = stack.settings.model_dump()
    base["kafka"].update(
        connection,
        sasl_password=broker.security.users[USER],
        input_topic=f"in-{name}", output_topic=f"out-{name}", dead_letter_topic=f"dlq-{name}", group_id=f"g-{name}",
    )  # fmt: skip
    base["kafka"].update(kafka)
    return Settings(**base)


def _raw_request(port: int, tls: ssl.SSLContext | None, frame: bytes) -> bytes:
    """Send one Kafka request frame, return what came back before the connection ended (b'' if nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        sock.sendall(struct.pack(">i", len(frame)) + frame)
        try:
            return sock.recv(1 << 16)
        except (ConnectionError, ssl.SSLError, OSError):
            return b""


def test_the_broker_refuses_plaintext_and_unauthenticated_requests(secured):
    broker, *_ = secured
    metadata_v0 = struct.pack(">hhih", 3, 0, 7, 4) + b"test" + struct.pack(">i", -1)
    # Plaintext Kafka to the TLS port: the handshake fails, nothing is answered.
    assert _raw_request(broker.port, None, metadata_v0) == b""
    # TLS but no SASL: a Metadata request is not answered, the connection is closed.
    tls = ssl.create_default_context(cafile=str(broker.security.cafile))
    assert _raw_request(broker.port, tls, metadata_v0) == b""


def test_worker_ops_and_readback_over_tls_and_scram(stack, secured, tmp_path, capsys):
    broker, password, _, broker_dir, _ = secured
    settings = _settings(stack, broker, "secure")
    k = settings.kafka
    assert k.security_protocol == "SASL_SSL" and k.sasl_mechanism == "SCRAM-SHA-512"
    front = broker._front
    assert front is not None
    refused, authenticated = front.refused, front.authenticated
    ensure_topics(k, {k.input_topic: 2, k.output_topic: 2, k.dead_letter_topic: 1})

    good = list(samples(24, prefix="sec"))
    bad = [(f"sec-bad-{i}".encode(), b"not an image " + MARKER) for i in range(4)]
    producer = make_writer(k, linger_ms=5)
    for key, value in [(s.key, s.value) for s in good] + bad:
        producer.send(k.input_topic, key=key, value=value)
    producer.flush()
    producer.close()

    worker_dir = tmp_path / "worker"
    worker = WorkerProcess(settings, worker_dir).start()
    try:
        result = read_until_complete(settings, [s.key for s in good] + [key for key, _ in bad], timeout_s=60)
    finally:
        worker.terminate()
    counts = accounting([s.key for s in good] + [key for key, _ in bad], result)
    assert counts == {"produced": 28, "embedded": 24, "dead_lettered": 4, "duplicates": 0, "missing": 0}, counts
    assert all(MARKER in d.value for d in result.dead_letters)  # the payload travelled intact, encrypted

    # The operations commands read through the same settings file as the worker.
    config = tmp_path / "ops.toml"
    config.write_text(dump_toml(settings))
    config.chmod(0o600)
    capsys.readouterr()
    assert run_ops(["dlq", "list", k.dead_letter_topic, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "4 dead letters" in out and all(key.decode() in out for key, _ in bad), out
    argv = ["tail", k.output_topic, "--config", str(config), "--from", "beginning", "--max", "24", "--timeout", "30"]
    assert run_ops(argv) == 0
    rows = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in rows) == sorted(s.key.decode() for s in good)
    # Every connection of the worker, the readback and the commands logged in; none was refused.
    assert front.refused == refused and front.authenticated > authenticated

    _no_secrets_in_logs([broker_dir, worker_dir, stack.workdir], password)


def test_wrong_password_stops_the_worker_within_seconds_naming_the_cause(stack, secured, tmp_path):
    broker, password, _, broker_dir, _ = secured
    settings = _settings(stack, broker, "wrongpw", sasl_password="not-" + password[::-1])
    t0 = time.monotonic()
    with pytest.raises(KafkaSecurityError, match="SASL authentication failed for user 'embed-svc'"):
        check_connection(settings.kafka)
    assert time.monotonic() - t0 < 5
    worker = WorkerProcess(settings, tmp_path / "worker")
    t0 = time.monotonic()
    worker.start()
    try:
        with pytest.raises(RuntimeStartError, match="SASL authentication failed for user 'embed-svc'") as info:
            worker.wait_ready(timeout_s=60)
    finally:
        worker.terminate()
    elapsed = time.monotonic() - t0
    assert "exited with code 2" in str(info.value)
    assert elapsed < 20, f"the worker took {elapsed:.1f}s to give up"
    print(f"wrong password: worker exited after {elapsed:.1f}s")
    _no_secrets_in_logs([broker_dir, tmp_path / "worker"], password)


def test_untrusted_ca_stops_the_worker_within_seconds_naming_the_cause(stack, secured, tmp_path):
    broker, password, other_ca, broker_dir, _ = secured
    settings = _settings(stack, broker, "untrusted", ssl_cafile=other_ca)
    worker = WorkerProcess(settings, tmp_path / "worker")
    t0 = time.monotonic()
    worker.start()
    try:
        with pytest.raises(RuntimeStartError, match="is not trusted by ssl_cafile") as info:
            worker.wait_ready(timeout_s=60)
    finally:
        worker.terminate()
    elapsed = time.monotonic() - t0
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert elapsed < 20, f"the worker took {elapsed:.1f}s to give up"
    print(f"untrusted CA: worker exited after {elapsed:.1f}s")
    _no_secrets_in_logs([broker_dir, tmp_path / "worker"], password)


def test_mutual_tls_requires_a_client_certificate(secured, tmp_path):
    _, password, _, _, tls_dir = secured
    ca, cert, key = tls_dir / "test-ca.pem", tls_dir / "client.pem", tls_dir / "client.key"
    security = BrokerSecurity(tls_dir / "server.pem", tls_dir / "server.key", {USER: password}, cafile=ca,
                              client_cafile=ca, client_certfile=cert, client_keyfile=key)  # fmt: skip
    broker = LocalBroker(tmp_path, security=security).start()  # its own readiness checks present the certificate
    try:
        check_connection(broker.client_settings())
        assert broker._front is not None and broker._front.authenticated >= 1
        # Without a client certificate the TLS session is refused: a raw ApiVersions request gets no answer.
        api_versions_v0 = struct.pack(">hhih", 18, 0, 1, 4) + b"test"
        no_cert = ssl.create_default_context(cafile=str(ca))
        assert _raw_request(broker.port, no_cert, api_versions_v0) == b""
        with_cert = ssl.create_default_context(cafile=str(ca))
        with_cert.load_cert_chain(str(cert), str(key))
        assert len(_raw_request(broker.port, with_cert, api_versions_v0)) > 8  # Tansu's ApiVersions answer
    finally:
        broker.stop()


def _no_secrets_in_logs(dirs: list[Path], password: str) -> None:
    logs = [p for d in dirs for p in Path(d).rglob("*.log") if p.is_file()]
    assert any(p.name == "broker.log" for p in logs) and any(p.name == "broker-front.log" for p in logs), logs
    for path in logs:
        data = path.read_bytes()
        assert password.encode() not in data, f"the SASL password is in {path}"
        assert MARKER not in data, f"a payload is in {path}"
