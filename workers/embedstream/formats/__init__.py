"""Input formats: what the producers of an input topic write, made into what a modality reads.

``input.format`` (``docs/inputs.md``):

- ``raw`` (default): the payload itself, or the modality's own JSON envelope, recognised per message;
- ``envelope``: every message is the modality's JSON envelope, whatever its first byte;
- ``avro``, ``protobuf``, ``json_schema``: Confluent schema-registry records, decoded through the
  registry (``registry``) and read through ``input.fields`` (``mapping``) by ``record_input.RecordInput``.

Images by reference are the image modality's own (``modalities/image.py`` with ``embedstream.fetch``):
a reference can come raw, in an envelope or in a mapped record field alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from embedstream.config import Settings
    from embedstream.modalities import Modality

__all__ = ["SCHEMA_ID_FIELD", "SOURCE_URI_FIELD", "input_fields", "sources_ready", "with_input_format"]

# Output columns the input adds (schemas/embedding.arrow.json, "input_fields"), present only where
# the worker reads such input, as a model's extra columns are present only where the model has them.
SOURCE_URI_FIELD = pa.field("source_uri", pa.string(), nullable=True)
SCHEMA_ID_FIELD = pa.field("schema_id", pa.int32(), nullable=True)


def input_fields(settings: Settings, modality: str) -> tuple[pa.Field, ...]:
    """``source_uri`` for an image worker that fetches references, ``schema_id`` for registry records."""
    fields: list[pa.Field] = []
    if modality == "image" and settings.fetch.enabled:
        fields.append(SOURCE_URI_FIELD)
    if settings.input.from_registry:
        fields.append(SCHEMA_ID_FIELD)
    return tuple(fields)


def with_input_format(modality: Modality, settings: Settings) -> Modality:
    """The modality as the worker runs it: itself for raw input, reading records or envelopes otherwise."""
    from embedstream.formats.record_input import RecordInput

    if settings.input.format == "raw" or isinstance(modality, RecordInput):
        return modality
    return RecordInput(modality, settings)


def sources_ready(modality: Any) -> bool:
    """Whether the services a modality reads from (a registry, an object store) answer; True if it has none."""
    probe = getattr(modality, "sources_ready", None)
    return True if probe is None else bool(probe())
