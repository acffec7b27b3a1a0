"""A tiny HTTP endpoint for probes and scraping (Kubernetes, compose, the demo).

``/metrics``: Prometheus metrics. ``/healthz``: the process loop is alive. ``/readyz``: 200 once
the worker has joined its consumer group (an empty assignment counts: extra workers are ready
standbys) and its inference backend answers, 503 otherwise. Both return JSON with the worker's
counters, never payloads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from embedstream.metrics import exposition


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

        self._server = ThreadingHTTPServer((host, port), Handler)
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
