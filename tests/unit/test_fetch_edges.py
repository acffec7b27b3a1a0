"""One slow or broken origin: each try bounded by fetch.timeout_s as bytes trickle, a probe that asks the
host and cannot hang, TLS failures as dead letters, a private CA, ports in allowed_hosts, and a host held
for at most fetch.max_hold_s. Origins on loopback addresses only (127.0.0.2)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from embedstream.config import FetchSettings
from embedstream.fetch.fetcher import Fetcher
from embedstream.fetch.outcomes import Away, Failed
from embedstream.fetch.references import host_allowed, parse
from embedstream.local.stack.process import free_port

from .test_fetch import ALLOWED_IP, BODY, Served, Server, fetcher, same, served, start

__all__ = ["served"]  # the fixture, shared with test_fetch

TIMEOUT_S = 0.5


class Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stop = threading.Event()
    heads = 0

    def log_message(self, *args):
        return None

    def do_HEAD(self):
        type(self).heads += 1
        self.stop.wait(30)

    def do_GET(self):
        if self.path == "/slow-headers":
            self.stop.wait(30)  # answers nothing for 30 s
            return
        if self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "9000")
            self.end_headers()
            for _ in range(9000):  # 10 bytes a second: each read returns, the object never completes
                if self.stop.wait(0.1):
                    return
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return


@pytest.fixture
def slow():
    Slow.stop.clear()
    Slow.heads = 0
    server = Server((ALLOWED_IP, 0), Slow)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[1]
    Slow.stop.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["/slow-headers", "/trickle"])
def test_a_slow_origin_is_a_timeout_dead_letter_within_the_stated_bound(slow, path):
    """Bound per reference: (retries + 1) x timeout_s + the backoffs, plus the 2 s host probe at most."""
    f = fetcher(timeout_s=TIMEOUT_S, retries=1, retry_backoff_s=0.01)
    began = time.monotonic()
    out = f.fetch(f"http://{ALLOWED_IP}:{slow}{path}", same)
    took = time.monotonic() - began
    assert isinstance(out, Failed) and out.reason == "fetch_timeout", out
    assert took < 2 * TIMEOUT_S + 0.01 + 1.0, f"{path}: {took:.2f} s"
    assert Slow.heads == 0  # the probe connects to the host; it never asks the slow object again
    assert f.ready()  # nothing is held for a host that answers


def test_a_wrong_port_is_held_then_dead_lettered_after_max_hold(served):
    port = free_port()  # nothing listens: connection refused
    f = fetcher(max_hold_s=0.3)
    uri = f"http://{ALLOWED_IP}:{port}/ok"
    first = f.fetch(uri, same)
    assert isinstance(first, Away)
    assert not f.ready() and f.held() == [f"{ALLOWED_IP}:{port}"]
    time.sleep(0.35)
    assert f.ready() and f.held() == []  # past max_hold_s the host no longer holds the stream
    later = f.fetch(uri, same)
    assert isinstance(later, Failed) and later.reason == "fetch_unavailable", later
    assert "fetch.max_hold_s" in later.message and "redrive" in later.message
    server = start(ALLOWED_IP, Served(), port)  # the host comes back: its references embed again
    try:
        assert f.fetch(uri, same) == BODY
        assert isinstance(f.fetch(f"http://{ALLOWED_IP}:{free_port()}/ok", same), Away)  # a new outage holds anew
    finally:
        server.shutdown()
        server.server_close()


def test_the_s3_endpoint_is_held_until_it_answers():
    f = Fetcher(FetchSettings(enabled=True, allowed_buckets=("b",), max_hold_s=0.0))
    f._went_away(parse("s3://b/k"), "down")
    assert f.held() == ["s3 aws"]  # max_hold_s applies to hosts named by the data, not the operator's store


def test_https_to_a_plain_http_port_is_a_tls_dead_letter(served):
    _, port = served
    out = fetcher(allowed_schemes=("https",)).fetch(f"https://{ALLOWED_IP}:{port}/ok", same)
    assert isinstance(out, Failed) and out.reason == "fetch_tls", out


@pytest.fixture
def tls_origin(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line for a self-signed certificate")
    cert, key = tmp_path / "origin.pem", tmp_path / "origin.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", f"/CN={ALLOWED_IP}", "-addext", f"subjectAltName=IP:{ALLOWED_IP}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server = start(ALLOWED_IP, Served())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


def test_a_self_signed_origin_is_a_dead_letter_until_its_ca_is_configured(tls_origin):
    port, cert = tls_origin
    uri = f"https://{ALLOWED_IP}:{port}/ok"
    out = fetcher(allowed_schemes=("https",)).fetch(uri, same)
    assert isinstance(out, Failed) and out.reason == "fetch_tls" and "certificate" in out.message.lower(), out
    assert fetcher(allowed_schemes=("https",), ca_file=Path(cert)).fetch(uri, same) == BODY


def test_allowed_hosts_may_name_a_port():
    assert host_allowed("img.example.com", ("img.example.com:8443",), 8443)
    assert not host_allowed("img.example.com", ("img.example.com:8443",), 443)
    assert host_allowed("img.example.com", ("img.example.com",), 9999)  # no port named: any port
    assert host_allowed("a.img.example.com", (".img.example.com:443",), 443)
    assert not host_allowed("a.img.example.com", (".img.example.com:443",), 80)
