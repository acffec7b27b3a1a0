"""``embedstream sink feast init DIR``: a Feast repository for our output rows, applied and ready.

One feature view per modality, ``embeddings_<modality>``, whose entity key is the sink's idempotency
key (row id, model name, model version): the online store keeps one value per row and model, so a
re-written row replaces itself and two model versions never overwrite each other. The features are
the embedding, the row's lineage (source topic/partition/offset), the modality's columns and the
columns its models may add (``ModalityDefaults.model_columns``: for time series, the autoencoder's
score and flag). ``event_time`` is the feature timestamp.

The repository stands alone (``features.py`` imports Feast only), so ``feast apply``, ``feast ui`` and
a training job's ``get_historical_features`` work on it without embedstream installed.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pyarrow as pa

from embedstream.modalities import defaults, modality_fields, registered

ENTITY_COLUMNS: tuple[str, ...] = ("id", "model_name", "model_version")
LINEAGE_FEATURES: tuple[tuple[str, str], ...] = (
    ("source_topic", "String"),
    ("source_partition", "Int32"),
    ("source_offset", "Int64"),
)

_FEAST_TYPES = {
    pa.string(): "String",
    pa.int32(): "Int32",
    pa.int64(): "Int64",
    pa.float32(): "Float32",
    pa.bool_(): "Bool",
}


def view_name(modality: str) -> str:
    return f"embeddings_{modality}"


def _feast_type(field: pa.Field) -> str:
    if pa.types.is_timestamp(field.type):
        return "UnixTimestamp"
    return _FEAST_TYPES[field.type]


def features_of(modality: str) -> list[tuple[str, str]]:
    """(column, Feast type) of the view's features, the embedding last."""
    columns = (*modality_fields(modality), *defaults(modality).model_columns)
    return [*LINEAGE_FEATURES, *((f.name, _feast_type(f)) for f in columns), ("embedding", "Array(Float32)")]


FEATURE_STORE_YAML = """\
# Written by `embedstream sink feast init`. Local: SQLite online store, file (Parquet) offline store.
project: {project}
provider: local
registry: data/registry.db
online_store:
  type: sqlite
  path: data/online.db
# Production: one online store that every sink replica and reader shares, e.g.
# online_store:
#   type: redis
#   connection_string: "redis-master:6379,password=${{REDIS_PASSWORD}}"
# online_store:
#   type: postgres
#   host: postgres
#   port: 5432
#   database: feast
#   user: feast
#   password: ${{POSTGRES_PASSWORD}}
# and a registry in a database too:  registry: {{registry_type: sql, path: "postgresql://feast:...@postgres/feast"}}
offline_store:
  type: file
entity_key_serialization_version: 2
"""


def features_py() -> str:
    used = sorted({t for m in registered() for _, dtype in features_of(m) for t in dtype.replace(")", "").split("(")})
    lines = [
        '"""Feature views of embedstream output rows (written by `embedstream sink feast init`)."""',
        "",
        "from datetime import timedelta",
        "",
        "from feast import Entity, FeatureView, Field, FileSource, ValueType",
        f"from feast.types import {', '.join(used)}",
        "",
        "# The sink's idempotency key: one stored value per input row and model version.",
        'row = Entity(name="row", join_keys=["id"], value_type=ValueType.STRING)',
        'model = Entity(name="model", join_keys=["model_name"], value_type=ValueType.STRING)',
        'model_version = Entity(name="model_version", join_keys=["model_version"], value_type=ValueType.STRING)',
    ]
    for modality in registered():
        name = view_name(modality)
        lines += [
            "",
            f"{name}_source = FileSource(",
            f'    name="{name}_source", path="data/{name}.parquet", timestamp_field="event_time"',
            ")",
            f"{name} = FeatureView(",
            f'    name="{name}",',
            "    entities=[row, model, model_version],",
            "    ttl=timedelta(0),  # an embedding does not expire",
            "    schema=[",
            *[f'        Field(name="{col}", dtype={dtype}),' for col, dtype in features_of(modality)],
            "    ],",
            f"    source={name}_source,",
            "    online=True,",
            f'    tags={{"embedstream.modality": "{modality}"}},',
            ")",
        ]
    return "\n".join(lines) + "\n"


def write_repo(directory: Path, project: str = "embedstream", apply: bool = True) -> list[Path]:
    """Write feature_store.yaml and features.py (and data/); with ``apply``, register them (``feast apply``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    written = [directory / "feature_store.yaml", directory / "features.py"]
    written[0].write_text(FEATURE_STORE_YAML.format(project=project))
    written[1].write_text(features_py())
    if apply:
        apply_repo(directory)
    return written


def apply_repo(directory: Path) -> None:
    """What ``feast apply`` does for this repository, in-process (its CLI changes the working directory)."""
    from feast import Entity, FeatureStore, FeatureView, FileSource

    objects: list[Any] = [
        obj
        for obj in runpy.run_path(str(directory / "features.py")).values()
        if isinstance(obj, Entity | FeatureView | FileSource)
    ]
    FeatureStore(repo_path=str(directory)).apply(objects)
