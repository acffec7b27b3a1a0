"""A version on Triton: loaded through the model repository API before its rollout starts, unloaded when it
is retired.

Triton runs with explicit model control wherever the project starts it (``embedstream up``, compose,
Kubernetes): it loads the repository's models at start and reads the repository again only when asked.
So the new version's export alone serves nothing; ``rollout start`` asks for it and waits until it is
ready, before any consumer group moves, and says what Triton answered when it cannot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from embedstream.config import TritonSettings
from embedstream.errors import ConfigError

log = logging.getLogger(__name__)


def _answer(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else exc).strip()


def load(
    triton: TritonSettings,
    model: str,
    timeout_s: float = 300.0,
    client_of: Callable[[TritonSettings], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Load ``model`` from the repository Triton serves (a reload where it is loaded) and wait until it is ready."""
    from embedstream.inference.triton import server_client

    client = (client_of or server_client)(triton)
    try:
        try:
            client.load_model(model)
        except Exception as exc:
            raise ConfigError(
                f"Triton at {triton.url} did not load model {model!r}: {_answer(exc)}. Export it into the model "
                "repository that Triton serves (`embedstream export-models --config ... --repo <that directory>`); "
                "Triton must run with --model-control-mode=explicit for the repository API"
            ) from exc
        deadline = time.monotonic() + timeout_s
        while not _ready(client, model):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"Triton at {triton.url} loaded {model!r} but it was not ready within {timeout_s:.0f} s"
                )
            sleep(0.5)
    finally:
        client.close()
    log.info("Triton at %s serves %s", triton.url, model)


def unload(triton: TritonSettings, model: str, client_of: Callable[[TritonSettings], Any] | None = None) -> str:
    """Ask Triton to stop serving ``model``; what happened, in words (a retire goes on either way)."""
    from embedstream.inference.triton import server_client

    try:
        client = (client_of or server_client)(triton)
        try:
            client.unload_model(model)
        finally:
            client.close()
    except Exception as exc:
        return f"Triton at {triton.url} did not unload {model}: {_answer(exc)}"
    return f"unloaded {model} from Triton at {triton.url}"


def _ready(client: Any, model: str) -> bool:
    try:
        return bool(client.is_model_ready(model))
    except Exception as exc:  # a server between load and ready can refuse the question
        log.debug("readiness of %s: %s", model, exc)
        return False
