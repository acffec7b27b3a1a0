"""The errors embedstream raises or carries, and what each one means for the stream.

    EmbedstreamError
    ├── ConfigError              fatal at start-up: a setting is missing or invalid
    ├── ModelMismatchError       fatal at start-up: the served model is not what the worker expects
    ├── RuntimeStartError        fatal: a local broker/Triton process could not be started
    ├── BackendError             inference failed; ``retriable`` says whether to try again
    ├── StoreUnavailable         a store did not acknowledge a write; the sink holds and retries
    ├── SourceUnavailable        a schema registry or object store did not answer; the worker holds and retries
    └── DeliveryError            the broker did not acknowledge an output; nothing is committed

Bad input is not an exception that travels up the stack: decoders return a
:class:`~embedstream.records.BadRecord` value, and the worker routes it to the
dead-letter topic with its reason (see ``schemas/dead-letter.json``).
"""

from __future__ import annotations


class EmbedstreamError(Exception):
    """Base of every error embedstream raises."""


class ConfigError(EmbedstreamError):
    """A setting is missing or invalid; the process must not start."""


class ModelMismatchError(EmbedstreamError):
    """The model Triton serves does not match the encoder spec the worker was configured with."""


class RuntimeStartError(EmbedstreamError):
    """A local runtime process (broker, Triton) could not be started or did not become ready."""


class BackendError(EmbedstreamError):
    """Inference failed. Retriable errors (server down, timeout) may succeed later; others will not."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class StoreUnavailable(EmbedstreamError):
    """A store did not acknowledge a write; nothing of it counts as stored. Always worth a retry."""


class SourceUnavailable(EmbedstreamError):
    """A service the input needs (a schema registry, an object store) did not answer: a retry, not a dead letter."""


class DeliveryError(EmbedstreamError):
    """The broker did not acknowledge an output or dead-letter message."""
