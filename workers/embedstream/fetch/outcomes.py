"""What a fetch ends in, as values (a fetch never raises into the worker).

``Failed`` is the reference's own fault (a dead letter with its reason); ``Away`` is the store's: it
did not answer, or kept failing, so the worker holds the batch and retries once a probe finds it back.
Sources raise the exceptions below; ``fetcher`` turns them into these values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failed:
    # fetch_not_found | fetch_forbidden | fetch_timeout | fetch_too_large | fetch_refused | fetch_tls |
    # fetch_unavailable | fetch_failed
    reason: str
    message: str
    error_class: str = "FetchError"


@dataclass(frozen=True)
class Away:
    message: str


class Final(Exception):
    """An answer that will not change on a retry (404, 403, too large, a broken reference)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Retry(Exception):
    """Worth another try: a timeout (``timeout``), a 5xx or 429, a connection cut mid-body."""

    def __init__(self, message: str, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


class NoAnswer(Exception):
    """The store did not answer at all (refused, unreachable, connect timeout, no credentials): an outage."""
