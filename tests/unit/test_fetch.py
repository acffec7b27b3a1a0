"""Fetching references over HTTP from servers these tests start on loopback.

The allowed server listens on 127.0.0.2 (named in allowed_networks); a honeypot on 127.0.0.1 counts
every request, and every refusal here (loopback by another name or spelling, a redirect to it) must
leave it at zero. Nothing leaves loopback.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from embedstream.config import FetchSettings, load_settings
from embedstream.consume.deadletter import REASON
from embedstream.fetch.fetcher import Fetcher
from embedstream.fetch.outcomes import Away, Failed
from embedstream.modalities.image import ImageModality
from embedstream.testing import FakeBackend, FakeConsumer, FakeProducer
from embedstream.worker import Worker

from .test_worker_loop import SPEC, png, rows

ALLOWED_IP = "127.0.0.2"
BODY = bytes(range(256)) * 64  # 16 KiB
CAP = 64 * 1024


class Served:
    def __init__(self):
        self.requests: list[str] = []
        self.flaky_left = 0
        self.active = 0
        self.peak = 0
        self.release = threading.Event()
        self.lock = threading.Lock()


def handler_for(state: Served):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            return None

        def do_HEAD(self):
            state.requests.append("HEAD " + self.path)
            self._send(200, b"", length=0)

        def do_GET(self):
            state.requests.append(self.path)
            path = self.path.split("?")[0]
            if path == "/ok":
                return self._send(200, BODY)
            if path.startswith("/img/"):
                return self._send(200, png(int(path.rsplit("/", 1)[1])))
            if path == "/missing":
                return self._send(404, b"no")
            if path == "/secret":
                return self._send(403, b"no")
            if path == "/gone-bad":
                return self._send(500, b"oops")
            if path == "/flaky":
                with state.lock:
                    state.flaky_left -= 1
                    bad = state.flaky_left >= 0
                return self._send(503 if bad else 200, b"later" if bad else BODY)
            if path == "/declared-big":
                self.send_response(200)
                self.send_header("Content-Length", str(CAP + 1))
                self.end_headers()
                return None
            if path == "/endless":
                return self._endless()
            if path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                state.release.wait(10)  # stalls the body until the test is over
                return None
            if path == "/busy":
                with state.lock:
                    state.active += 1
                    state.peak = max(state.peak, state.active)
                time.sleep(0.05)
                with state.lock:
                    state.active -= 1
                return self._send(200, BODY)
            if path.startswith("/redirect"):
                target = self.path.split("to=", 1)[1]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._send(400, b"?")

        def _send(self, status, body, length=None):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _endless(self):
            # No Content-Length: only a cap enforced while reading stops this.
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 8192
            try:
                for _ in range(100_000):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                return

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        return None  # a client that stopped reading (the byte cap) resets the connection: expected here


def start(host, state, port=0):
    server = Server((host, port), handler_for(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def served():
    state = Served()
    server = start(ALLOWED_IP, state)
    yield state, server.server_address[1]
    state.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def honeypot():
    state = Served()
    server = start("127.0.0.1", state)
    yield state, server.server_address[1]
    state.release.set()
    server.shutdown()
    server.server_close()


def fetcher(**kw):
    base = {
        "enabled": True, "allowed_schemes": ("http",), "allowed_hosts": (ALLOWED_IP, "localhost", "127.0.0.1",
        "2130706433", "0x7f000001", "127.1"), "allowed_networks": (f"{ALLOWED_IP}/32",), "timeout_s": 0.5,
        "retries": 1, "retry_backoff_s": 0.01, "max_object_bytes": CAP, "concurrency": 4,
    }  # fmt: skip
    return Fetcher(FetchSettings(**{**base, **kw}))


def same(data):
    return data


def test_fetches_the_bytes(served):
    _, port = served
    assert fetcher().fetch(f"http://{ALLOWED_IP}:{port}/ok", same) == BODY


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/missing", "fetch_not_found"), ("/secret", "fetch_forbidden"), ("/declared-big", "fetch_too_large"),
     ("/endless", "fetch_too_large"), ("/slow", "fetch_timeout")],
)  # fmt: skip
def test_failures_have_their_reasons(served, path, reason):
    _, port = served
    out = fetcher().fetch(f"http://{ALLOWED_IP}:{port}{path}", same)
    assert isinstance(out, Failed) and out.reason == reason, out


def test_a_5xx_is_retried_and_a_store_that_keeps_failing_is_an_outage(served):
    state, port = served
    state.flaky_left = 1
    f = fetcher()
    assert f.fetch(f"http://{ALLOWED_IP}:{port}/flaky", same) == BODY
    assert state.requests.count("/flaky") == 2
    out = f.fetch(f"http://{ALLOWED_IP}:{port}/gone-bad", same)
    assert isinstance(out, Away) and "500" in out.message
    assert state.requests.count("/gone-bad") == 2, "one try and fetch.retries=1 retry, 5xx only"
    assert state.requests.count("/missing") == 0


def test_a_store_that_does_not_answer_is_an_outage_until_it_does(served):
    from embedstream.local.stack.process import free_port

    port = free_port()
    f = fetcher()
    out = f.fetch(f"http://{ALLOWED_IP}:{port}/ok", same)
    assert isinstance(out, Away)
    assert not f.ready()
    server = start(ALLOWED_IP, Served(), port)
    try:
        assert f.ready()
        assert f.fetch(f"http://{ALLOWED_IP}:{port}/ok", same) == BODY
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "127.1"])
def test_loopback_under_any_name_or_spelling_is_refused_and_never_reached(honeypot, host):
    state, port = honeypot
    out = fetcher().fetch(f"http://{host}:{port}/ok", same)
    assert isinstance(out, Failed) and out.reason == "fetch_refused", out
    assert state.requests == []


def test_a_redirect_to_a_refused_address_is_refused_and_never_followed(served, honeypot):
    _, port = served
    pot, pot_port = honeypot
    for target in (f"http://127.0.0.1:{pot_port}/ok", f"http://localhost:{pot_port}/ok"):
        out = fetcher().fetch(f"http://{ALLOWED_IP}:{port}/redirect?to={target}", same)
        assert isinstance(out, Failed) and out.reason == "fetch_refused", out
    assert pot.requests == []
    # A redirect to an allowed place is followed, and the redirect limit holds.
    ok = fetcher().fetch(f"http://{ALLOWED_IP}:{port}/redirect?to=/ok", same)
    assert ok == BODY
    loop = f"http://{ALLOWED_IP}:{port}/redirect?to=/redirect%3Fto=/ok"
    out = fetcher(max_redirects=1).fetch(loop, same)
    assert isinstance(out, Failed) and out.reason == "fetch_refused" and "redirects" in out.message


def test_concurrency_is_bounded(served):
    state, port = served
    f = fetcher(concurrency=3)
    futures = [f.submit(f"http://{ALLOWED_IP}:{port}/busy", same) for _ in range(12)]
    assert all(fut.result(timeout=30) == BODY for fut in futures)
    assert 1 <= state.peak <= 3


def test_bytes_in_flight_are_bounded_until_the_consumer_is_done(served):
    _, port = served
    f = fetcher(concurrency=4, max_bytes_in_flight=len(BODY) * 2)
    seen = []

    def consume(data):
        seen.append(f.budget.in_use)
        time.sleep(0.02)
        return len(data)

    futures = [f.submit(f"http://{ALLOWED_IP}:{port}/ok", consume) for _ in range(8)]
    assert [fut.result(timeout=30) for fut in futures] == [len(BODY)] * 8
    assert max(seen) <= len(BODY) * 2 and f.budget.in_use == 0


def test_not_allowed_and_malformed_references(served):
    _, port = served
    cases = {
        f"http://{ALLOWED_IP}:{port}/ok": ("fetch_refused", {"allowed_schemes": ("https",)}),
        f"http://{ALLOWED_IP}:{port}/x": ("fetch_refused", {"allowed_hosts": ("img.test",)}),
        "s3://bucket/key": ("fetch_refused", {}),
        "http://": ("fetch_failed", {}),
    }
    for uri, (reason, kw) in cases.items():
        out = fetcher(**kw).fetch(uri, same)
        assert isinstance(out, Failed) and out.reason == reason, (uri, out)


# -- through the worker -------------------------------------------------------------------------------


def image_worker(records, port, clock):
    settings = load_settings(
        batch={"max_size": 4, "max_wait_ms": 0},
        encoder={"max_batch_size": 8},
        fetch={"enabled": True, "allowed_schemes": ["http"], "allowed_hosts": [ALLOWED_IP],
               "allowed_networks": [f"{ALLOWED_IP}/32"], "timeout_s": 0.5, "retries": 0},
        commit_interval_ms=0,
        worker_id="w-ref",
    )  # fmt: skip
    consumer = FakeConsumer({0: records})
    producer = FakeProducer(ack_immediately=True)
    worker = Worker(settings, ImageModality(SPEC, settings), FakeBackend(SPEC), consumer, producer, clock=clock)
    consumer.subscribe(["images"], listener=None)
    worker.on_assigned(sorted(consumer.assignment()))
    return worker, consumer, producer


def test_references_embed_like_the_same_images_inline_and_keep_their_uri(served):
    _, port = served
    refs = [(b"r%d" % i, f"http://{ALLOWED_IP}:{port}/img/{i * 20}".encode()) for i in range(6)]
    inline = [(b"i%d" % i, png(i * 20)) for i in range(6)]
    bad = [(b"missing", f"http://{ALLOWED_IP}:{port}/missing".encode()), (b"lo", b"http://127.0.0.1:9/x")]
    worker, consumer, producer = image_worker(refs + inline + bad, port, time.monotonic)
    for _ in range(200):
        worker.step()
        if consumer.drained() and not worker.status()["in_flight"]:
            break
    worker.drain()
    out = {r["key"]: r for r in rows(producer)}
    for i in range(6):
        by_ref, by_value = out[b"r%d" % i], out[b"i%d" % i]
        assert by_ref["embedding"] == pytest.approx(by_value["embedding"], abs=1e-6)
        assert by_ref["source_uri"] == refs[i][1].decode() and by_value["source_uri"] is None
    reasons = {k: dict(h)[REASON] for k, _, h in producer.sent["deadletter.image"]}
    assert reasons == {b"missing": b"fetch_not_found", b"lo": b"fetch_refused"}


def test_an_object_store_outage_holds_the_batch_and_recovers_with_none_missing():
    from embedstream.local.stack.process import free_port

    port = free_port()
    clock = [0.0]
    refs = [(b"r%d" % i, f"http://{ALLOWED_IP}:{port}/img/{i}".encode()) for i in range(10)]
    worker, consumer, producer = image_worker(refs, port, lambda: clock[0])
    for _ in range(100):
        worker.step()
        if worker.status()["degraded"]:
            break
    assert worker.status()["degraded"] and "unavailable" in worker.status()["degraded_reason"]
    assert consumer.committed.get(next(iter(consumer.assignment())), 0) == 0
    assert "deadletter.image" not in producer.sent, "an outage is not a dead letter per message"
    server = start(ALLOWED_IP, Served(), port)
    try:
        for _ in range(400):
            clock[0] += 0.5
            worker.step()
            if consumer.drained() and not worker.status()["degraded"] and not worker.status()["in_flight"]:
                break
        worker.drain()
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(r["key"] for r in rows(producer)) == sorted(k for k, _ in refs)
    assert "deadletter.image" not in producer.sent and worker.stats.outages >= 1
