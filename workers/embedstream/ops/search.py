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
        .select([*RESULT_COLUMNS, "_distance"])
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


@dataclass(frozen=True)
class TableModel:
    """The model whose rows a table holds: what a new query must be embedded with."""

    name: str
    version: str
    dim: int


def table_model(table: Any) -> TableModel:
    """(model name, version, embedding width) of a table's rows (one table per model version)."""
    first = table.search().select(["model_name", "model_version"]).limit(1).to_arrow()
    if first.num_rows == 0:
        raise ConfigError(f"table {table.name!r} is empty: nothing to search")
    dim = table.schema.field("embedding").type.list_size
    return TableModel(str(first.column("model_name")[0]), str(first.column("model_version")[0]), int(dim))


def embed_query(
    settings: Any,
    model: TableModel,
    *,
    image: bytes | None = None,
    text: str | None = None,
    ready_timeout_s: float = 30.0,
) -> np.ndarray:
    """One new input embedded by the served model that made the table's rows, as a worker embeds a
    message: the worker's Triton client reads the model's spec from Triton, the modality decodes and
    stacks the input exactly as it does a message's bytes, one inference. No Kafka on the way.

    Refuses a served model of another version or width than the table's rows (its vectors would lie
    in another space), and an image for a text model or the other way round.
    """
    from embedstream.inference.triton import TritonBackend
    from embedstream.modalities import modality_for
    from embedstream.records import BadRecord, SourceMessage

    if (image is None) == (text is None):
        raise ValueError("embed_query takes an image or a text, one of them")
    wanted = "image" if image is not None else "text"
    backend = TritonBackend.for_served_model(settings.triton, model.name, ready_timeout_s)
    try:
        spec = backend.spec
        if spec.modality != wanted:
            raise ConfigError(f"table of {model.name!r} holds {spec.modality} rows: query it with --{spec.modality}")
        if spec.version != model.version or spec.embedding_dim != model.dim:
            raise ConfigError(
                f"Triton at {settings.triton.url} serves {spec.name} version {spec.version} ({spec.embedding_dim}-d); "
                f"the table holds version {model.version} ({model.dim}-d) rows: serve that version to search it"
            )
        modality = modality_for(spec, settings)
        value = image if image is not None else (text or "").encode()
        msg = SourceMessage("query", 0, 0, b"query", value, 0)
        decoded = modality.decode_many([msg])[0]
        if isinstance(decoded, BadRecord):
            raise ConfigError(f"the query cannot be embedded: {decoded.reason}: {decoded.message}")
        outputs = backend.infer(modality.stack([decoded]))
        return np.asarray(outputs[spec.embedding_output.name][0], np.float32)
    finally:
        backend.close()


def search_new(settings: Any, table: Any, k: int, *, image: bytes | None = None, text: str | None = None) -> list[Hit]:
    """The k rows of ``table`` nearest to a new image or sentence, embedded by the table's served model."""
    vector = embed_query(settings, table_model(table), image=image, text=text)
    return nearest(table, vector, k)


class AliasReader:
    """Searches by rollout alias (``embedstream/aliases.py``): the alias is resolved once per search and the whole
    search reads that version's table, so a result never mixes versions, and a switch or rollback takes
    effect from the next search on, with no reader restarted."""

    def __init__(self, lancedb_uri: str, state_location: str | None = None) -> None:
        from datetime import timedelta

        import lancedb

        from embedstream.aliases import state_location as default_location

        self.state_location = default_location(lancedb_uri, state_location)
        # Tables check for a newer version on every read, so a search sees each write of a sink beside it.
        self._db = lancedb.connect(lancedb_uri, read_consistency_interval=timedelta(0))
        self._tables: dict[str, Any] = {}

    def table(self, alias: str) -> tuple[Any, Any]:
        """(the serving ModelRef, its table) as of now."""
        from embedstream.aliases import resolve

        model = resolve(self.state_location, alias)
        table = self._tables.get(model.table)
        if table is None:
            try:
                table = self._tables[model.table] = self._db.open_table(model.table)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"alias {alias!r} points at {model}, whose table {model.table!r} is missing") from exc
        return model, table

    def search_by_id(self, alias: str, row_id: str, k: int) -> tuple[Any, list[Hit]]:
        model, table = self.table(alias)
        return model, search_by_id(table, row_id, k)

    def nearest(self, alias: str, vector: np.ndarray, k: int) -> tuple[Any, list[Hit]]:
        model, table = self.table(alias)
        return model, nearest(table, vector, k)
