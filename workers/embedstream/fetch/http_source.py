"""http(s) references through httpx: one hop at a time, each to an address the guard checked.

httpx because it streams a body chunk by chunk (the byte cap is enforced while reading, never after),
lets each redirect be seen before it is followed, and can connect to a checked IP address while the
request keeps its host name (``Host`` header, TLS server name and certificate check). Proxies from
the environment are not used: a proxy would make the connection that the guard checked.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from embedstream.config import FetchSettings
from embedstream.fetch.budget import CHUNK, ByteBudget, read_capped
from embedstream.fetch.guard import AddressGuard
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
            trust_env=False,
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
        )

    def fetch(self, ref: Reference, budget: ByteBudget) -> tuple[bytes, int]:
        """The body and the bytes it reserved (the caller releases them once the body is used)."""
        deadline = time.monotonic() + self._settings.timeout_s
        for _ in range(self._settings.max_redirects + 1):
            resp = self._open(ref, "GET")
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
        """Whether the reference's server answers at all (any status counts): the outage probe."""
        try:
            self._open(ref, "HEAD", timeout=min(2.0, self._settings.timeout_s)).close()
        except (NoAnswer, Retry, Final):
            return False
        return True

    def close(self) -> None:
        self._client.close()

    def _open(self, ref: Reference, method: str, timeout: float | None = None) -> httpx.Response:
        url = httpx.URL(ref.uri)
        try:
            address = self._guard.address_for(ref.host, ref.port)
        except OSError as exc:  # the name does not resolve
            raise Final("fetch_failed", f"{ref.host}: {exc}") from None
        extensions: dict[str, Any] = {}
        if ref.scheme == "https":
            extensions["sni_hostname"] = ref.host
        if timeout is not None:
            extensions["timeout"] = httpx.Timeout(timeout).as_dict()
        request = self._client.build_request(
            method, url.copy_with(host=address), headers={"Host": url.netloc.decode("ascii")}, extensions=extensions
        )
        try:
            return self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
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
        try:
            try:
                return read_capped(resp.iter_bytes(CHUNK), ref.uri, cap, deadline), reserved
            except httpx.TimeoutException as exc:
                raise Retry(f"{ref.uri}: {type(exc).__name__} while reading", timeout=True) from None
            except httpx.TransportError as exc:
                raise Retry(f"{ref.uri}: {type(exc).__name__} while reading: {exc}", timeout=False) from None
        except BaseException:
            budget.release(reserved)
            raise


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
