"""/readyz over real HTTP says degraded as soon as the backend stops answering, before any batch fails."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import orjson

from embedstream.health import BackendWatch, HealthServer
from embedstream.testing import FakeBackend, FakeConsumer, FakeProducer

from .test_worker_loop import SPEC, make_worker


class IdleConsumer(FakeConsumer):
    """A consumer with nothing to read that waits out its poll timeout like a real one."""

    def poll(self, timeout_ms: int = 0, max_records: int | None = None):
        out = super().poll(timeout_ms, max_records)
        if not out:
            time.sleep(timeout_ms / 1000)
        return out


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def wait_for(port: int, degraded: bool, timeout_s: float) -> tuple[float, int, dict]:
    """Seconds until /readyz says ``degraded`` (and, when not, ready), with its code and body."""
    started = time.monotonic()
    while True:
        code, body = readyz(port)
        if body.get("degraded") is degraded and (degraded or body.get("ready")):
            return time.monotonic() - started, code, body
        assert time.monotonic() - started < timeout_s, body
        time.sleep(0.02)


class Running:
    """A worker loop on a thread with its health endpoint, as ``run_worker`` wires them."""

    def __init__(self, backend: FakeBackend) -> None:
        self.worker, _, _ = make_worker(
            {0: []},
            producer=FakeProducer(ack_immediately=True),
            backend=backend,
            consumer_type=IdleConsumer,
            triton={"health_probe_interval_s": 0.05, "health_probe_timeout_s": 0.3},
        )
        self.stop = threading.Event()
        self.health = HealthServer("127.0.0.1", 0, self.worker.status).start()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.health.stop()
        self.worker.close()


def test_readyz_turns_degraded_within_a_probe_of_the_backend_refusing_and_back_when_it_answers():
    backend = FakeBackend(SPEC)
    with Running(backend) as run:
        _, code, body = wait_for(run.health.port, degraded=False, timeout_s=5)
        assert code == 200 and body["ready"] is True
        backend.down = True  # nothing is being inferred: only the probe can notice
        took, code, body = wait_for(run.health.port, degraded=True, timeout_s=2)
        print(f"degraded {took:.2f}s after the backend went down")
        assert code == 503 and body["ready"] is False
        assert "readiness probe" in body["degraded_reason"]
        assert took < 1.0
        assert run.worker.stats.outages == 0, "only reported: no batch failed, nothing was paused"
        backend.down = False
        _, code, _ = wait_for(run.health.port, degraded=False, timeout_s=2)
        assert code == 200


def test_readyz_turns_degraded_when_a_probe_hangs_past_its_timeout():
    backend = FakeBackend(SPEC)
    frozen = threading.Event()
    thawed = threading.Event()
    real_ready = backend.ready

    def ready() -> bool:
        if frozen.is_set():
            thawed.wait(10)  # a frozen server: the call neither answers nor fails
        return real_ready()

    backend.ready = ready  # type: ignore[method-assign]
    with Running(backend) as run:
        wait_for(run.health.port, degraded=False, timeout_s=5)
        frozen.set()
        took, code, body = wait_for(run.health.port, degraded=True, timeout_s=3)
        print(f"degraded {took:.2f}s after the backend froze")
        assert code == 503 and "unanswered" in body["degraded_reason"]
        assert 0.2 < took < 1.5
        thawed.set()
        frozen.clear()
        wait_for(run.health.port, degraded=False, timeout_s=2)


def test_watch_reports_errors_and_recovers_on_a_fake_clock():
    now = [0.0]
    answers: list[object] = [True, False, RuntimeError("boom"), True]

    def ready() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)

    watch = BackendWatch(ready, interval_s=1.0, timeout_s=2.0, clock=lambda: now[0])
    assert watch.probe() and watch.failing is None
    assert not watch.probe() and watch.failing == "readiness probe: model not ready"
    assert not watch.probe() and watch.failing == "readiness probe: model not ready", "the first reason is kept"
    assert watch.probe() and watch.failing is None


def test_a_health_port_in_use_is_a_config_error_that_names_the_way_out():
    """Two sinks started on one host as docs/sinks.md starts them: the second one's port is taken."""
    import pytest

    from embedstream.errors import ConfigError

    first = HealthServer("127.0.0.1", 0, lambda: {"ready": True}).start()
    try:
        with pytest.raises(ConfigError, match=r"in use .*--health-port.*0 for any free port"):
            HealthServer("127.0.0.1", first.port, lambda: {"ready": True})
    finally:
        first.stop()
