"""http(s) references through httpx: one hop at a time, each to an address the guard checked.

httpx because it streams a body chunk by chunk (the byte cap is enforced while reading, never after),
lets each redirect be seen before it is followed, and can connect to a checked IP address while the
request keeps its host name (``Host`` header, TLS server name and certificate check). Proxies from
the environment are not used: a proxy would make the connection that the guard checked.

A try has one wall-clock deadline (``fetch.timeout_s``) for connect, headers and body together: each
phase may wait only for what is left of it, and the body is checked as each piece arrives (a server
that trickles bytes is cut off at the deadline, not after a 64 KiB chunk). A TLS failure (an untrusted
or wrong certificate, TLS to a plain-HTTP port) is the reference's fault, a dead letter
(``fetch_tls``): another try or a wait would not change it.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

import certifi
import httpx

from embedstream.config import FetchSettings
from embedstream.fetch.budget import ByteBudget, read_capped
from embedstream.fetch.guard import AddressGuard, Refused
from embedstream.fetch.outcomes import Final, NoAnswer, Retry
from embedstream.fetch.references import Reference, check_allowed, parse

_REDIRECTS = (301, 302, 303, 307, 308)


class HttpSource:
    def __init__(self, settings: FetchSettings, guard: AddressGuard) -> None:
        self._settings = settings
        self._guard = guard
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.timeout_s),
            follow_redirects=False,
            trust_env=False,  # no proxies from the environment; the CA environment is read below
            verify=tls_context(settings),
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
        )

    def fetch(self, ref: Reference, budget: ByteBudget) -> tuple[bytes, int]:
        """The body and the bytes it reserved (the caller releases them once the body is used)."""
        deadline = time.monotonic() + self._settings.timeout_s
        for _ in range(self._settings.max_redirects + 1):
            resp = self._open(ref, "GET", deadline)
            try:
                if resp.status_code in _REDIRECTS:
                    ref = self._next_hop(ref, resp)
                    continue
                _raise_for_status(resp.status_code, ref.uri)
                return self._read(resp, ref, budget, deadline)
            finally:
                resp.close()
        raise Final("fetch_refused", f"more than fetch.max_redirects={self._settings.max_redirects} redirects")

    def answers(self, ref: Reference) -> bool:
        """Whether the reference's host takes a connection at all: the probe that tells a slow object
        (the host answers: a timeout is the reference's) from a host that is down. It asks the host, not
        the slow object, and is bounded by 2 s, so it cannot hang the stream itself."""
        try:
            address = self._guard.address_for(ref.host, ref.port)
            with socket.create_connection((address, ref.port), timeout=min(2.0, self._settings.timeout_s)):
                return True
        except (OSError, Refused):  # a refused address is never connected to, not even to probe it
            return False

    def close(self) -> None:
        self._client.close()

    def _open(self, ref: Reference, method: str, deadline: float) -> httpx.Response:
        url = httpx.URL(ref.uri)
        try:
            address = self._guard.address_for(ref.host, ref.port)
        except OSError as exc:  # the name does not resolve
            raise Final("fetch_failed", f"{ref.host}: {exc}") from None
        extensions: dict[str, Any] = {}
        if ref.scheme == "https":
            extensions["sni_hostname"] = ref.host
        left = deadline - time.monotonic()
        if left <= 0:
            raise Retry(f"{ref.uri}: not complete within fetch.timeout_s", timeout=True)
        extensions["timeout"] = httpx.Timeout(left).as_dict()
        request = self._client.build_request(
            method, url.copy_with(host=address), headers={"Host": url.netloc.decode("ascii")}, extensions=extensions
        )
        try:
            return self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if tls := _tls_failure(exc):
                raise Final("fetch_tls", f"{ref.uri}: TLS with {ref.host}:{ref.port} failed: {tls}") from None
            raise NoAnswer(f"{ref.host}:{ref.port} did not answer: {type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise Retry(f"{ref.uri}: {type(exc).__name__}", timeout=True) from None
        except httpx.TransportError as exc:
            raise Retry(f"{ref.uri}: {type(exc).__name__}: {exc}", timeout=False) from None

    def _next_hop(self, ref: Reference, resp: httpx.Response) -> Reference:
        location = resp.headers.get("location")
        if not location:
            raise Final("fetch_failed", f"{ref.uri}: redirect {resp.status_code} without a Location")
        target = parse(str(httpx.URL(ref.uri).join(location)))
        if target.scheme == "s3":
            raise Final("fetch_refused", f"{ref.uri} redirects to {target.uri}")
        check_allowed(target, self._settings)  # the guard checks its address when it is opened
        return target

    def _read(self, resp: httpx.Response, ref: Reference, budget: ByteBudget, deadline: float) -> tuple[bytes, int]:
        cap = self._settings.max_object_bytes
        declared = resp.headers.get("content-length")
        size = int(declared) if declared and declared.isdigit() else None
        if size is not None and size > cap:
            raise Final("fetch_too_large", f"{ref.uri}: {size} bytes > fetch.max_object_bytes {cap}")
        reserved = budget.reserve(size if size is not None else cap)
        # The body's reads wait only for what is left of the try (httpcore reads this when the body starts).
        timeouts = resp.request.extensions.get("timeout")
        if isinstance(timeouts, dict):
            timeouts["read"] = max(0.01, deadline - time.monotonic())
        try:
            try:
                # Pieces as they arrive (no chunk size), so the deadline is checked while bytes trickle.
                return read_capped(resp.iter_bytes(), ref.uri, cap, deadline), reserved
            except httpx.TimeoutException as exc:
                raise Retry(f"{ref.uri}: {type(exc).__name__} while reading", timeout=True) from None
            except httpx.TransportError as exc:
                raise Retry(f"{ref.uri}: {type(exc).__name__} while reading: {exc}", timeout=False) from None
        except BaseException:
            budget.release(reserved)
            raise


def tls_context(settings: FetchSettings) -> ssl.SSLContext:
    """The system's CAs (and SSL_CERT_FILE / SSL_CERT_DIR), certifi's, and ``fetch.ca_file`` where set."""
    context = ssl.create_default_context()
    context.load_verify_locations(certifi.where())
    if settings.ca_file is not None:
        try:
            context.load_verify_locations(str(settings.ca_file))
        except (OSError, ssl.SSLError) as exc:
            from embedstream.errors import ConfigError

            raise ConfigError(f"fetch.ca_file {settings.ca_file}: not a readable PEM CA bundle ({exc})") from None
    return context


def _tls_failure(exc: BaseException) -> str | None:
    """What TLS said, where a connection failed in its handshake (not for a refused or unreachable host)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return getattr(seen, "verify_message", None) or seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "SSLError"):
        if marker in text:
            return text
    return None


def _raise_for_status(status: int, uri: str) -> None:
    if 200 <= status < 300:
        return
    if status in (404, 410):
        raise Final("fetch_not_found", f"{uri}: HTTP {status}")
    if status in (401, 403):
        raise Final("fetch_forbidden", f"{uri}: HTTP {status}")
    if status == 429 or status >= 500:
        raise Retry(f"{uri}: HTTP {status}", timeout=False)
    raise Final("fetch_failed", f"{uri}: HTTP {status}")
