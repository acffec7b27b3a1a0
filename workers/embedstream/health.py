"""A tiny HTTP endpoint for probes and scraping (Kubernetes, compose, the demo).

``/metrics``: Prometheus metrics. ``/healthz``: the process loop is alive. ``/readyz``: 200 once
the worker has joined its consumer group (an empty assignment counts: extra workers are ready
standbys) and its inference backend answers, 503 otherwise. Both return JSON with the worker's
counters, never payloads.

Whether the backend answers is watched on a thread of its own (``BackendWatch``): a readiness probe
every ``triton.health_probe_interval_s``, so ``/readyz`` says ``degraded`` within about one interval of
the server going away (refused: at once; frozen: once a probe has waited ``health_probe_timeout_s``),
not only once a batch has used up its retries.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from embedstream.errors import ConfigError
from embedstream.metrics import exposition

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]]) -> None:
        status_fn = status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    raw, content_type = exposition()
                    self.send_response(200)
                    self.send_header("content-type", content_type)
                    self.send_header("content-length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                body = status_fn()
                if self.path.startswith("/readyz"):
                    code = 200 if body.get("ready") else 503
                elif self.path.startswith("/healthz"):
                    code = 200 if body.get("live", True) else 503
                else:
                    code, body = 404, {"error": "try /healthz, /readyz or /metrics"}
                raw = orjson.dumps(body)
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # Two services on one host (a worker and a sink, two sinks) both default to 8080.
            raise ConfigError(
                f"the health port {host}:{port} is in use (another worker or sink on this host?): "
                "give each process its own health_port (--health-port, EMBEDSTREAM_HEALTH_PORT), or 0 for any free port"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class BackendWatch:
    """Probes ``ready`` (the backend's model-readiness call) on its own thread and says whether it fails.

    ``failing`` is the reason while the last probe failed (refused, error, not ready) or while a probe
    has had no answer for more than ``timeout_s`` (a frozen server holds the call open), else None.
    The thread only observes: pausing and holding batches stays with the loop's outage handling.
    """

    def __init__(
        self,
        ready: Callable[[], bool],
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ready = ready
        self._interval = interval_s
        self._timeout = timeout_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending_since: float | None = None  # a probe is waiting for its answer since then
        self._failed_since: float | None = None
        self._why = ""

    def start(self) -> BackendWatch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="backend-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop probing; a probe stuck on a frozen server is left to its daemon thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probe()
            self._stop.wait(self._interval)

    def probe(self) -> bool:
        """One readiness probe, now, on this thread; True when the backend answered ready."""
        started = self._pending_since = self._clock()
        try:
            ok = bool(self._ready())
            why = "" if ok else "readiness probe: model not ready"
        except Exception as exc:  # the backend's own ready() should not raise; count it as down if it does
            ok, why = False, f"readiness probe failed: {type(exc).__name__}: {exc}"
        self._pending_since = None
        if ok:
            if self._failed_since is not None:
                log.info("inference backend answers its readiness probe again")
            self._failed_since, self._why = None, ""
        elif self._failed_since is None:
            self._failed_since, self._why = started, why
            log.warning("inference backend does not answer (%s): reporting degraded", why)
        return ok

    @property
    def failing(self) -> str | None:
        pending = self._pending_since
        if pending is not None and self._clock() - pending > self._timeout:
            return f"readiness probe unanswered for {self._clock() - pending:.1f}s (server frozen or unreachable)"
        return self._why if self._failed_since is not None else None
