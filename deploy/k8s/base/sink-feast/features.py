"""Feature views of embedstream output rows (written by `embedstream sink feast init`)."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, Int32, Int64, String, UnixTimestamp

# The sink's idempotency key: one stored value per input row and model version.
row = Entity(name="row", join_keys=["id"], value_type=ValueType.STRING)
model = Entity(name="model", join_keys=["model_name"], value_type=ValueType.STRING)
model_version = Entity(name="model_version", join_keys=["model_version"], value_type=ValueType.STRING)

embeddings_image_source = FileSource(
    name="embeddings_image_source", path="data/embeddings_image.parquet", timestamp_field="event_time"
)
embeddings_image = FeatureView(
    name="embeddings_image",
    entities=[row, model, model_version],
    ttl=timedelta(0),  # an embedding does not expire
    schema=[
        Field(name="source_topic", dtype=String),
        Field(name="source_partition", dtype=Int32),
        Field(name="source_offset", dtype=Int64),
        Field(name="source_width", dtype=Int32),
        Field(name="source_height", dtype=Int32),
        Field(name="embedding", dtype=Array(Float32)),
    ],
    source=embeddings_image_source,
    online=True,
    tags={"embedstream.modality": "image"},
)

embeddings_text_source = FileSource(
    name="embeddings_text_source", path="data/embeddings_text.parquet", timestamp_field="event_time"
)
embeddings_text = FeatureView(
    name="embeddings_text",
    entities=[row, model, model_version],
    ttl=timedelta(0),  # an embedding does not expire
    schema=[
        Field(name="source_topic", dtype=String),
        Field(name="source_partition", dtype=Int32),
        Field(name="source_offset", dtype=Int64),
        Field(name="truncated", dtype=Bool),
        Field(name="token_count", dtype=Int32),
        Field(name="embedding", dtype=Array(Float32)),
    ],
    source=embeddings_text_source,
    online=True,
    tags={"embedstream.modality": "text"},
)

embeddings_timeseries_source = FileSource(
    name="embeddings_timeseries_source", path="data/embeddings_timeseries.parquet", timestamp_field="event_time"
)
embeddings_timeseries = FeatureView(
    name="embeddings_timeseries",
    entities=[row, model, model_version],
    ttl=timedelta(0),  # an embedding does not expire
    schema=[
        Field(name="source_topic", dtype=String),
        Field(name="source_partition", dtype=Int32),
        Field(name="source_offset", dtype=Int64),
        Field(name="series_id", dtype=String),
        Field(name="window_start", dtype=UnixTimestamp),
        Field(name="window_end", dtype=UnixTimestamp),
        Field(name="points", dtype=Int32),
        Field(name="messages_finished", dtype=Int32),
        Field(name="reconstruction_error", dtype=Float32),
        Field(name="anomaly", dtype=Bool),
        Field(name="embedding", dtype=Array(Float32)),
    ],
    source=embeddings_timeseries_source,
    online=True,
    tags={"embedstream.modality": "timeseries"},
)
