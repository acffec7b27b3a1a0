"""A test double of a Confluent schema registry: the REST calls confluent-kafka's client makes, in memory.

No Confluent-compatible registry installs from PyPI (Karapace builds only from source), so the
integration tests run this one on loopback. It speaks the same JSON over HTTP for what producers and
the worker use: registering a schema under a subject (``POST /subjects/{s}/versions``, same schema,
same id), looking one up (``POST /subjects/{s}``), ``GET /schemas/ids/{id}``, ``/subjects``,
``/subjects/{s}/versions[/{v}|latest]`` and ``/config``, with the registry's error bodies (404 with
40401 / 40403). It keeps no compatibility rules. It counts requests by path, and ``stop`` / ``start``
take it away and bring it back on the same port (an outage, as clients see one: connection refused).
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.connections: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def cut(self) -> None:
        """Close the kept-alive connections too: a registry that went away answers nothing."""
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RegistryDouble:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: Counter[str] = Counter()
        self._schemas: dict[int, dict[str, Any]] = {}
        self._subjects: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> RegistryDouble:
        self._server = _Server((self.host, self.port), _handler(self))
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.cut()
            self._server = None

    def __enter__(self) -> RegistryDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API --------------------------------------------------------------------------------------

    def register(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        entry = {"schema": body["schema"], "schemaType": body.get("schemaType", "AVRO"),
                 "references": body.get("references") or []}  # fmt: skip
        with self._lock:
            found = next((i for i, e in self._schemas.items() if e == entry), None)
            schema_id = found if found is not None else len(self._schemas) + 1
            self._schemas[schema_id] = entry
            versions = self._subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return {"id": schema_id, "subject": subject, "version": versions.index(schema_id) + 1, **entry}

    def schema(self, schema_id: int) -> dict[str, Any] | None:
        with self._lock:
            return self._schemas.get(schema_id)

    def version(self, subject: str, version: str) -> dict[str, Any] | None:
        with self._lock:
            ids = self._subjects.get(subject)
            if not ids:
                return None
            index = len(ids) if version == "latest" else int(version)
            if not 1 <= index <= len(ids):
                return None
            schema_id = ids[index - 1]
            return {"subject": subject, "version": index, "id": schema_id, **self._schemas[schema_id]}

    def lookup(self, subject: str, body: dict[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            for index, schema_id in enumerate(self._subjects.get(subject, []), start=1):
                if self._schemas[schema_id]["schema"] == body["schema"]:
                    return {"subject": subject, "version": index, "id": schema_id, **self._schemas[schema_id]}
        return None

    def subjects(self) -> list[str]:
        with self._lock:
            return sorted(self._subjects)


def _handler(registry: RegistryDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            parts, _query = self._route()
            if parts == ["subjects"]:
                return self._json(200, registry.subjects())
            if parts == ["config"]:
                return self._json(200, {"compatibilityLevel": "NONE"})
            if parts == ["schemas", "types"]:
                return self._json(200, ["AVRO", "JSON", "PROTOBUF"])
            if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and parts[2].isdigit():
                entry = registry.schema(int(parts[2]))
                return self._json(200, entry) if entry else self._error(404, 40403, "Schema not found")
            if len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions":
                found = registry.version(parts[1], "latest")
                if found is None:
                    return self._error(404, 40401, "Subject not found")
                return self._json(200, list(range(1, found["version"] + 1)))
            if len(parts) == 4 and parts[0] == "subjects" and parts[2] == "versions":
                found = registry.version(parts[1], parts[3])
                return self._json(200, found) if found else self._error(404, 40402, "Version not found")
            return self._error(404, 404, f"no route {self.path}")

        def do_POST(self) -> None:
            parts, _query = self._route()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions":
                return self._json(200, registry.register(parts[1], body))
            if len(parts) == 2 and parts[0] == "subjects":
                found = registry.lookup(parts[1], body)
                return self._json(200, found) if found else self._error(404, 40403, "Schema not found")
            return self._error(404, 404, f"no route {self.path}")

        def _route(self) -> tuple[list[str], dict[str, list[str]]]:
            split = urlsplit(self.path)
            registry.requests[split.path] += 1
            return [unquote(p) for p in split.path.strip("/").split("/")], parse_qs(split.query)

        def _json(self, status: int, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: int, message: str) -> None:
            self._json(status, {"error_code": code, "message": message})

    return Handler
