"""Concurrent, bounded fetches of references; the outcome of each is a value.

At most ``fetch.concurrency`` fetches run at once, on threads of their own, and at most
``fetch.max_bytes_in_flight`` bytes are held by fetched objects until their consumer (``then``,
e.g. the image decoder, run on the same thread) is done with them. Timeouts, 5xx and 429 are
retried with exponential backoff; nothing else is. A fetch that timed out on every try becomes
``fetch_timeout`` only if its store still takes a connection; a store that does not answer (or keeps
answering 5xx) is ``Away``: an outage. ``ready`` probes the stores that were away.

Which stores are held, and for how long: the S3 endpoint is the operator's own and is held until it
answers. An http(s) host is named by the data, so it is held for at most ``fetch.max_hold_s`` from
its first failure; after that its references are dead-lettered as ``fetch_unavailable`` (redrivable
once it is back) and the stream goes on, until a fetch from it succeeds again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from embedstream.config import FetchSettings
from embedstream.fetch.budget import ByteBudget
from embedstream.fetch.guard import AddressGuard, Refused
from embedstream.fetch.http_source import HttpSource
from embedstream.fetch.outcomes import Away, Failed, Final, NoAnswer, Retry
from embedstream.fetch.references import Malformed, Reference, check_allowed, parse
from embedstream.fetch.s3_source import S3Source

log = logging.getLogger(__name__)

T = TypeVar("T")


class Fetcher:
    def __init__(
        self,
        settings: FetchSettings,
        guard: AddressGuard | None = None,
        s3_client: Any | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.budget = ByteBudget(settings.max_bytes_in_flight)
        self._http = HttpSource(settings, guard or AddressGuard(settings.allowed_networks))
        self._s3 = S3Source(settings, s3_client)
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="fetch")
        self._sleep = sleep
        self._away: dict[str, Reference] = {}  # per store, a reference to probe it with
        self._away_since: dict[str, float] = {}  # per http(s) host: when it first failed (monotonic)
        self._lock = threading.Lock()
        self._clock = time.monotonic

    def submit(self, uri: str, then: Callable[[bytes], T]) -> Future[T | Failed | Away]:
        """Fetch on a fetch thread and hand the bytes to ``then`` there; the budget is freed after it."""
        return self._pool.submit(self.fetch, uri, then)

    def fetch(self, uri: str, then: Callable[[bytes], T]) -> T | Failed | Away:
        try:
            ref = parse(uri)
            check_allowed(ref, self.settings)
        except Malformed as exc:
            return Failed("fetch_failed", str(exc), "Malformed")
        except Refused as exc:
            return Failed("fetch_refused", str(exc), "Refused")
        source = self._s3 if ref.scheme == "s3" else self._http
        last: Retry | None = None
        for attempt in range(self.settings.retries + 1):
            if attempt:
                self._sleep(self.settings.retry_backoff_s * 2 ** (attempt - 1))
            try:
                data, reserved = source.fetch(ref, self.budget)
            except Retry as exc:
                last = exc
                continue
            except Final as exc:
                return Failed(exc.reason, str(exc))
            except Refused as exc:  # a redirect's target, or its address
                return Failed("fetch_refused", str(exc), "Refused")
            except Malformed as exc:
                return Failed("fetch_failed", str(exc), "Malformed")
            except NoAnswer as exc:
                return self._went_away(ref, str(exc))
            self._answered(ref)
            try:
                return then(data)
            finally:
                self.budget.release(reserved)
        if last is None:  # the loop runs at least once and returns unless it kept a Retry
            raise RuntimeError("fetch ended without an outcome")
        if last.timeout and source.answers(ref):
            return Failed("fetch_timeout", f"{last} ({self.settings.retries + 1} tries)", "TimeoutError")
        return self._went_away(ref, f"{last} ({self.settings.retries + 1} tries)")

    def ready(self) -> bool:
        """Probe each store that was away; True once none is held (an http(s) host past
        ``fetch.max_hold_s`` no longer holds the stream: its references are dead-lettered)."""
        with self._lock:
            away = list(self._away.items())
        for store, ref in away:
            source = self._s3 if ref.scheme == "s3" else self._http
            if source.answers(ref):
                with self._lock:
                    self._away.pop(store, None)
                    self._away_since.pop(store, None)
                log.info("object store %s answers again", store)
        with self._lock:
            return not self.held()

    def held(self) -> list[str]:
        """The stores the stream waits for now (``/readyz`` names them)."""
        now = self._clock()
        return [
            s for s, ref in self._away.items()
            if ref.scheme == "s3" or now - self._away_since.get(s, now) < self.settings.max_hold_s
        ]  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _store(self, ref: Reference) -> str:
        return f"s3 {self.settings.s3_endpoint_url or 'aws'}" if ref.scheme == "s3" else f"{ref.host}:{ref.port}"

    def _answered(self, ref: Reference) -> None:
        store = self._store(ref)
        with self._lock:
            if self._away.pop(store, None) is not None:
                log.info("object store %s answers again", store)
            self._away_since.pop(store, None)

    def _went_away(self, ref: Reference, why: str) -> Away | Failed:
        store = self._store(ref)
        now = self._clock()
        with self._lock:
            self._away[store] = ref
            since = self._away_since.setdefault(store, now) if ref.scheme != "s3" else now
        if ref.scheme != "s3" and now - since >= self.settings.max_hold_s:
            return Failed(
                "fetch_unavailable",
                f"{store} has not answered for {now - since:.0f} s (fetch.max_hold_s {self.settings.max_hold_s:g}): "
                f"{why}; redrive once it is back",
                "Unavailable",
            )
        return Away(f"object store {store} unavailable: {why}")
