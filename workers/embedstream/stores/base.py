"""What every store does for the sink: admit or refuse a message's rows, upsert admitted rows.

A refusal is about the rows (their shape does not fit the store's table, a vector is not finite): it
goes to the sink's dead-letter topic and the stream goes on. A failed write of admitted rows is an
outage (``StoreUnavailable``): the sink holds the rows, commits nothing past them and retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedstream.errors import StoreUnavailable as StoreUnavailable  # stores raise it from here

KEY_COLUMNS: tuple[str, ...] = ("id", "model_name", "model_version")
"""The idempotency key: one stored row per input row and model."""


@dataclass(frozen=True)
class Refusal:
    reason: str  # a dead-letter reason (schemas/dead-letter.json)
    message: str
    error_class: str = "StoreRefused"


class Store(Protocol):
    name: str

    def admit(self, table: pa.Table) -> pa.Table | Refusal:
        """The rows as the store will write them, or why it will not take them. Cheap, no store write."""

    def write(self, tables: list[pa.Table]) -> int:
        """Upsert admitted rows; returns rows written. Raises StoreUnavailable when the store failed."""

    def close(self) -> None:
        """Release connections."""


def model_of(table: pa.Table) -> tuple[str, str]:
    """(model name, model version) of one output message: every row of a message has the same."""
    meta = table.schema.metadata or {}
    name = meta.get(b"embedstream.model_name", b"").decode()
    version = meta.get(b"embedstream.model_version", b"").decode()
    if (not name or not version) and table.num_rows:
        name, version = str(table.column("model_name")[0]), str(table.column("model_version")[0])
    return name, version


def modality_of(table: pa.Table) -> str:
    return (table.schema.metadata or {}).get(b"embedstream.modality", b"").decode()


def check_rows(table: pa.Table) -> Refusal | None:
    """The rules every store applies before a write: key columns present, vectors finite."""
    missing = [c for c in (*KEY_COLUMNS, "embedding") if c not in table.column_names]
    if missing:
        return Refusal("store_rejected", f"missing column(s) {', '.join(missing)}", "SchemaError")
    if table.num_rows == 0:
        return None
    if any(table.column(c).null_count for c in KEY_COLUMNS):
        return Refusal("store_rejected", "a row has a null id, model_name or model_version", "SchemaError")
    emb = table.column("embedding")
    if not pa.types.is_fixed_size_list(emb.type):
        return Refusal("store_rejected", f"embedding is {emb.type}, not a fixed-size list of float32", "SchemaError")
    values = pc.list_flatten(emb).to_numpy(zero_copy_only=False)
    if not np.isfinite(values).all():
        return Refusal("non_finite", "an embedding holds NaN or infinity", "ValueError")
    return None


def latest_per_key(table: pa.Table) -> pa.Table:
    """One row per idempotency key, the last one read (a merge would call two source rows ambiguous)."""
    keys = zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS), strict=True)
    last: dict[tuple[object, ...], int] = {}
    for i, key in enumerate(keys):
        last[key] = i
    if len(last) == table.num_rows:
        return table
    return table.take(pa.array(sorted(last.values()), pa.int64()))
