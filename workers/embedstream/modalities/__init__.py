"""Modalities: what the worker loop needs to know about one kind of input.

Each modality lives in its own module and registers itself; the Arrow columns it adds to the
output are declared in ``sinks/arrow_codec.py`` (``MODALITY_FIELDS``), beside the common ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import Settings
    from embedstream.encoders import EncoderSpec
    from embedstream.records import BadRecord, SourceMessage
    from embedstream.sinks.arrow_codec import RowMeta


class Modality(Protocol):
    name: str

    def decode(self, msg: SourceMessage) -> Any | BadRecord:
        """Bytes -> an item the model can take, or a BadRecord (never an exception)."""

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[Any]:
        """``decode`` for what one poll returned, in order; a modality batches or parallelises it here."""

    def stack(self, items: Sequence[Any]) -> tuple[np.ndarray, ...]:
        """Items -> the model's input tensors for one batch, in the spec's input order."""

    def row(self, item: Any) -> RowMeta:
        """Provenance and modality columns of the item's output row."""


ModalityFactory = Callable[["EncoderSpec", "Settings"], Modality]
_MODALITIES: dict[str, ModalityFactory] = {}
_MODULES = {
    "image": "embedstream.modalities.image",
    "text": "embedstream.modalities.text",
    "timeseries": "embedstream.modalities.timeseries",
}


def register_modality(name: str, factory: ModalityFactory) -> None:
    _MODALITIES[name] = factory


def modality_for(spec: EncoderSpec, settings: Settings) -> Modality:
    if spec.modality not in _MODALITIES and spec.modality in _MODULES:
        importlib.import_module(_MODULES[spec.modality])
    factory = _MODALITIES.get(spec.modality)
    if factory is None:
        raise ConfigError(f"no worker for modality {spec.modality!r} (known: {sorted(_MODULES)})")
    return factory(spec, settings)
