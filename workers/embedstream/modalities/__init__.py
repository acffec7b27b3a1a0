"""Modalities: everything the worker loop needs to know about one kind of input, one module each.

A modality module owns its decoding (bytes -> its record type, or a BadRecord value), its record
type, the Arrow columns it adds to the output (``FIELDS``) and the values of those columns by name.
It registers itself under its name, which is its module's name: every public module of this package
is a modality (``MODALITIES``), so adding one is adding its module. With it, it declares its
:class:`ModalityDefaults` (its pipeline's topics, encoder families, settings sections and batching
on the local stack, its models' extra columns), which the tools around the worker read through
:func:`registered` and :func:`defaults` instead of naming modalities. A modality whose preprocessing
depends on files beside the worker (the text tokenizer) also registers a check of those against the
served spec (:func:`served_problems`), which the Triton backend runs when it verifies the served model.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
from kafka.structs import TopicPartition

from embedstream.errors import ConfigError
from embedstream.modalities._defaults import ModalityDefaults, ModalityTopics

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings, Settings
    from embedstream.encoders import EncoderSpec
    from embedstream.records import BadRecord, Deferred, RowMeta, SourceMessage


class Modality(Protocol):
    """What the loop calls, and nothing else: the loop reads no attribute a modality does not declare here."""

    name: str
    fields: tuple[pa.Field, ...]  # the modality's output columns, after the common ones

    def decode(self, msg: SourceMessage) -> Any | BadRecord | Deferred:
        """Bytes -> an item the model can take, a BadRecord, or a Deferred (never an exception)."""

    def decode_many(self, msgs: Sequence[SourceMessage]) -> Sequence[Any | BadRecord | Deferred]:
        """``decode`` for what one poll returned, in order; a modality batches or parallelises it here."""

    def prepare(self, items: Sequence[Any]) -> Sequence[Any | BadRecord]:
        """One batch's items made ready for ``stack``, in order: what ``decode`` left for the inference thread.

        Runs on the inference thread, so work that releases the GIL (a tokenizer's batch call) overlaps
        the loop; an item that cannot be made ready comes back as a BadRecord (never an exception).
        """

    def stack(self, items: Sequence[Any]) -> tuple[np.ndarray, ...]:
        """Items -> the model's input tensors for one batch, in the spec's input order."""

    def row(self, item: Any) -> RowMeta:
        """Provenance and the modality's columns (by field name) of the item's output row."""

    def covers(self, item: Any) -> list[tuple[TopicPartition, int]]:
        """The input offsets the item's row finishes once it is acknowledged."""

    def event_time_ms(self, item: Any) -> int:
        """When the item's input happened, for the end-to-end latency metric."""

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Drop state kept for partitions this worker lost; their new owner rebuilds it from the log."""


ModalityFactory = Callable[["EncoderSpec", "Settings"], Modality]
# A served spec and the worker's encoder settings -> what differs, one line each (none: nothing).
ServedCheck = Callable[["EncoderSpec", "EncoderSettings"], list[str]]
_FACTORIES: dict[str, ModalityFactory] = {}
_FIELDS: dict[str, tuple[pa.Field, ...]] = {}
_SERVED_CHECKS: dict[str, ServedCheck] = {}
_DEFAULTS: dict[str, ModalityDefaults] = {}
MODALITIES: dict[str, str] = {
    info.name: f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")
}


__all__ = [
    "MODALITIES",
    "Modality",
    "ModalityDefaults",
    "ModalityTopics",
    "OneRowPerMessage",
    "defaults",
    "modality_fields",
    "modality_for",
    "register_modality",
    "registered",
    "served_problems",
]


def register_modality(
    name: str,
    factory: ModalityFactory,
    fields: tuple[pa.Field, ...],
    served_check: ServedCheck | None = None,
    *,
    defaults: ModalityDefaults,
) -> None:
    _FACTORIES[name] = factory
    _FIELDS[name] = fields
    _DEFAULTS[name] = defaults
    if served_check is not None:
        _SERVED_CHECKS[name] = served_check


def _load(name: str) -> None:
    if name not in _FACTORIES:
        if name not in MODALITIES:
            raise ConfigError(f"no worker for modality {name!r} (known: {sorted(MODALITIES)})")
        importlib.import_module(MODALITIES[name])


def modality_for(spec: EncoderSpec, settings: Settings) -> Modality:
    _load(spec.modality)
    return _FACTORIES[spec.modality](spec, settings)


def served_problems(spec: EncoderSpec, encoder: EncoderSettings) -> list[str]:
    """Where the preprocessing this worker would run differs from the one ``spec`` was exported with.

    The worker prepares the model's inputs itself, so the served preprocessing fingerprint holds only
    if what it prepares them with is the exporter's; only the modality knows what that is. Checked
    before the modality is built, so a mismatch is reported with the served model's other differences.
    A modality no worker has is left to :func:`modality_for`, which names the known ones.
    """
    if spec.modality not in _FACTORIES and spec.modality not in MODALITIES:
        return []
    _load(spec.modality)
    check = _SERVED_CHECKS.get(spec.modality)
    return check(spec, encoder) if check is not None else []


def modality_fields(name: str) -> tuple[pa.Field, ...]:
    """The Arrow columns a modality adds to its output rows."""
    _load(name)
    return _FIELDS[name]


def registered() -> tuple[str, ...]:
    """Every modality's name, in name order (each module loaded, so each has registered)."""
    for name in MODALITIES:
        _load(name)
    return tuple(sorted(_DEFAULTS))


def defaults(name: str) -> ModalityDefaults:
    """What ``name`` declared about its pipeline and columns; ConfigError for a modality no module provides."""
    _load(name)
    return _DEFAULTS[name]


class _OwnRow(Protocol):
    source: SourceMessage
    event_time_ms: int


class OneRowPerMessage:
    """For modalities whose every item is one message's row and that keep no state across messages."""

    def prepare(self, items: Sequence[Any]) -> Sequence[Any]:
        return items  # decode made them ready

    def covers(self, item: _OwnRow) -> list[tuple[TopicPartition, int]]:
        src = item.source
        return [(TopicPartition(src.topic, src.partition), src.offset)]

    def event_time_ms(self, item: _OwnRow) -> int:
        return item.event_time_ms

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        return None
