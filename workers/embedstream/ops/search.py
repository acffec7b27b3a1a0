"""``embedstream search``: the k nearest stored rows of a LanceDB table, to a stored row or a new input.

A query by row id reads that row's stored vector; a new image or sentence is embedded by the model
Triton serves (the one that made the table's rows), so the query lies in the table's vector space.
Distances are cosine distances, the metric the sink's ANN index is built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from embedstream.errors import ConfigError

RESULT_COLUMNS = ("id", "source_topic", "source_partition", "source_offset", "model_name", "model_version")


@dataclass(frozen=True)
class Hit:
    id: str
    distance: float
    row: dict[str, Any]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def vector_of(table: Any, row_id: str) -> np.ndarray:
    found = table.search().where(f"id = {_quote(row_id)}").select(["embedding"]).limit(1).to_arrow()
    if found.num_rows == 0:
        raise ConfigError(f"no row with id {row_id!r} in table {table.name!r}")
    return np.asarray(found.column("embedding")[0].values.to_numpy(zero_copy_only=False), np.float32)


def nearest(table: Any, vector: np.ndarray, k: int, exclude_id: str | None = None) -> list[Hit]:
    """The k nearest rows by cosine distance (the ANN index when there is one, else an exact scan)."""
    limit = k + (1 if exclude_id is not None else 0)
    result: pa.Table = (
        table.search(np.asarray(vector, np.float32), vector_column_name="embedding")
        .metric("cosine")
        .select(list(RESULT_COLUMNS))
        .limit(limit)
        .to_arrow()
    )
    hits = [
        Hit(str(row["id"]), float(row["_distance"]), {c: row[c] for c in RESULT_COLUMNS})
        for row in result.to_pylist()
        if row["id"] != exclude_id
    ]
    return hits[:k]


def search_by_id(table: Any, row_id: str, k: int) -> list[Hit]:
    return nearest(table, vector_of(table, row_id), k, exclude_id=row_id)


def pick_table(names: list[str], wanted: str | None) -> str:
    """The named table, or the only one there is."""
    if wanted is not None:
        if wanted not in names:
            raise ConfigError(f"no LanceDB table {wanted!r}; tables: {', '.join(names) or '(none)'}")
        return wanted
    if len(names) != 1:
        raise ConfigError(f"name a table with --table; tables: {', '.join(names) or '(none)'}")
    return names[0]


def embed_query(settings: Any, *, image: bytes | None = None, text: str | None = None) -> np.ndarray:
    """One new input embedded by the served model, as a worker would (decode, infer), without Kafka."""
    from embedstream.encoders import served_model_name
    from embedstream.inference.triton import TritonBackend
    from embedstream.modalities import modality_for
    from embedstream.records import BadRecord, SourceMessage

    value = image if image is not None else (text or "").encode()
    backend = TritonBackend.for_served_model(settings.triton, served_model_name(settings.encoder), 30.0)
    try:
        modality = modality_for(backend.spec, settings)
        msg = SourceMessage("query", 0, 0, b"query", value, 0)
        decoded = modality.decode(msg)
        if isinstance(decoded, BadRecord):
            raise ConfigError(f"the query cannot be embedded: {decoded.reason}: {decoded.message}")
        outputs = backend.infer(modality.stack([decoded]))
        return np.asarray(outputs[backend.spec.embedding_output.name][0], np.float32)
    finally:
        backend.close()
