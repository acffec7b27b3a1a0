"""The Arrow contract of the output topic: schema, encoder and the ``decode_embeddings`` helper.

One Kafka message on an output topic holds one Arrow IPC *stream* (schema + record batches)
with one row per input message. ``schemas/embedding.arrow.json`` describes the same schema in
language-neutral form; a test holds this module to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from embedstream.lineage import UNKNOWN
from embedstream.modalities import modality_fields
from embedstream.records import RowMeta

__all__ = [
    "COMMON_FIELDS",
    "CONTENT_TYPE",
    "SCHEMA_VERSION",
    "BatchEncoder",
    "RowMeta",
    "decode_embeddings",
    "embeddings_matrix",
    "encode_batch",
    "model_field",
    "output_schema",
]

SCHEMA_VERSION = "1"
CONTENT_TYPE = "application/vnd.apache.arrow.stream"

# Columns every modality carries, in order; the modality's own columns follow (``FIELDS`` in its
# module), then the model's extra outputs, then `embedding`.
COMMON_FIELDS: tuple[pa.Field, ...] = (
    pa.field("key", pa.binary(), nullable=True),
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_topic", pa.string(), nullable=False),
    pa.field("source_partition", pa.int32(), nullable=False),
    pa.field("source_offset", pa.int64(), nullable=False),
    pa.field("event_time", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
)

_ARROW_TYPE = {"FP32": pa.float32(), "BOOL": pa.bool_(), "INT32": pa.int32(), "INT64": pa.int64()}


def model_field(column: str, triton_dtype: str) -> pa.Field:
    """A per-row column filled from a model output other than the embedding."""
    return pa.field(column, _ARROW_TYPE[triton_dtype], nullable=False)


def output_schema(
    modality: str,
    model_name: str,
    model_version: str,
    dim: int,
    model_fields: Sequence[pa.Field] = (),
    *,
    weights_sha256: str = UNKNOWN,
    preprocessing_sha256: str = UNKNOWN,
    input_fields: Sequence[pa.Field] = (),
) -> pa.Schema:
    """Common columns, then the modality's own (it declares them), the input's (``formats.input_fields``:
    a reference, a schema id), the model's extra outputs, the embedding.

    The fingerprints name the weights and preprocessing the served model was exported with
    (``docs/lineage.md``); ``unknown`` for a model exported before them.
    """
    fields = [
        *COMMON_FIELDS,
        *modality_fields(modality),
        *input_fields,
        *model_fields,
        pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), dim), nullable=False),
    ]
    metadata = {
        "embedstream.schema_version": SCHEMA_VERSION,
        "embedstream.modality": modality,
        "embedstream.model_name": model_name,
        "embedstream.model_version": model_version,
        "embedstream.embedding_dim": str(dim),
        "embedstream.weights_sha256": weights_sha256,
        "embedstream.preprocessing_sha256": preprocessing_sha256,
    }
    return pa.schema(fields, metadata=metadata)


# End-of-stream marker of the IPC stream format (continuation token, zero-length metadata).
_IPC_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class BatchEncoder:
    """Encodes batches of one output schema; what does not change between batches is worked out once.

    A worker encodes one message per batch per partition, and at small batches the fixed cost of an
    encode (types, metadata, the stream writer re-serialising the schema) dominated: this keeps the
    serialised schema and per-column types, and frames each batch as schema + batch + end-of-stream,
    byte for byte what ``pyarrow.ipc.new_stream`` writes.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._dim: int = schema.field("embedding").type.list_size
        self._types = {f.name: f.type for f in schema}
        # The columns between the common ones and the embedding: the modality's and the model's, by name.
        self._extra = [(f.name, f.type) for f in list(schema)[len(COMMON_FIELDS) : -1]]
        meta = schema.metadata or {}
        self._model_name = pa.scalar(meta.get(b"embedstream.model_name", b"").decode(), self._types["model_name"])
        self._model_version = pa.scalar(
            meta.get(b"embedstream.model_version", b"").decode(), self._types["model_version"]
        )
        self._schema_bytes = schema.serialize().to_pybytes()

    def encode(
        self,
        rows: Sequence[RowMeta],
        embeddings: np.ndarray,
        model_columns: Mapping[str, np.ndarray] | None = None,
    ) -> bytes:
        """Rows + an (N, dim) float32 array -> one Arrow IPC stream. The embedding buffer is not copied.

        ``model_columns`` fills the schema's model fields (other model outputs, one value per row).
        """
        return self.encode_slices(rows, embeddings, model_columns, [(0, len(rows))])[0]

    def encode_slices(
        self,
        rows: Sequence[RowMeta],
        embeddings: np.ndarray,
        model_columns: Mapping[str, np.ndarray] | None,
        slices: Sequence[tuple[int, int]],
    ) -> list[bytes]:
        """One IPC stream per ``(start, length)`` run of rows, the columns built once for all of them.

        A micro-batch spans partitions and leaves as one message per partition: building its
        columns once and serialising zero-copy slices costs a fraction of encoding each part alone.
        A slice decodes to the same table; its message may carry a validity bitmap more.
        """
        batch = self._record_batch(rows, embeddings, model_columns or {})
        return [
            b"".join((self._schema_bytes, batch.slice(start, length).serialize().to_pybytes(), _IPC_EOS))
            for start, length in slices
        ]

    def _record_batch(
        self, rows: Sequence[RowMeta], embeddings: np.ndarray, model_columns: Mapping[str, np.ndarray]
    ) -> pa.RecordBatch:
        dim, types, n = self._dim, self._types, len(rows)
        if embeddings.shape != (n, dim):
            raise ValueError(f"embeddings shape {embeddings.shape} does not match {n} rows x {dim}")
        flat = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)
        columns: list[pa.Array] = [
            pa.array([r.key for r in rows], types["key"]),
            pa.array([r.id for r in rows], types["id"]),
            pa.array([r.topic for r in rows], types["source_topic"]),
            pa.array([r.partition for r in rows], types["source_partition"]),
            pa.array([r.offset for r in rows], types["source_offset"]),
            pa.array([r.timestamp_ms for r in rows], types["event_time"]),
            pa.repeat(self._model_name, n),
            pa.repeat(self._model_version, n),
        ]
        for name, type_ in self._extra:
            if name in model_columns:
                columns.append(pa.array(np.asarray(model_columns[name]).reshape(n), type_))
            else:
                columns.append(pa.array([r.extra.get(name) for r in rows], type_))
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), dim))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


def encode_batch(
    schema: pa.Schema,
    rows: Sequence[RowMeta],
    embeddings: np.ndarray,
    model_columns: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """One-off form of :class:`BatchEncoder` (a worker keeps one encoder per output schema)."""
    return BatchEncoder(schema).encode(rows, embeddings, model_columns)


def decode_embeddings(value: bytes) -> pa.Table:
    """Decode one output-topic message value into an Arrow table (any consumer can use this)."""
    table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
    version = (table.schema.metadata or {}).get(b"embedstream.schema_version", b"?").decode()
    if version != SCHEMA_VERSION:
        raise ValueError(f"unsupported embedstream schema version {version!r} (this reader: {SCHEMA_VERSION})")
    return table


def embeddings_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as an (N, dim) float32 array, without copying when possible."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
