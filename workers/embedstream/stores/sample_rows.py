"""Output-topic messages made without a worker: the sink's tests and bench stage feed these to a broker.

Each message is what a worker publishes (``BatchEncoder`` over the output schema), so the sink reads
them exactly as it reads a live output topic; the vectors are seeded random, the ids unique.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedstream.records import RowMeta
from embedstream.sinks.arrow_codec import BatchEncoder, output_schema


@dataclass(frozen=True)
class SampleMessage:
    key: bytes
    value: bytes
    ids: list[str]
    vectors: np.ndarray  # (rows, dim) float32, as encoded


def sample_messages(
    rows: int,
    rows_per_message: int = 32,
    dim: int = 64,
    *,
    model_name: str = "sample_encoder",
    model_version: str = "1",
    seed: int = 0,
    id_prefix: str = "row",
) -> list[SampleMessage]:
    """Image-modality messages of ``rows_per_message`` rows each (the last may hold fewer)."""
    rng = np.random.default_rng(seed)
    encoder = BatchEncoder(output_schema("image", model_name, model_version, dim))
    out: list[SampleMessage] = []
    for start in range(0, rows, rows_per_message):
        n = min(rows_per_message, rows - start)
        ids = [f"{id_prefix}-{i:07d}" for i in range(start, start + n)]
        metas = [
            RowMeta(
                key=i.encode(),
                id=i,
                topic="images",
                partition=0,
                offset=start + j,
                timestamp_ms=1_700_000_000_000 + start + j,
                extra={"source_width": 640, "source_height": 480},
            )
            for j, i in enumerate(ids)
        ]
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        out.append(SampleMessage(f"images/{start}".encode(), encoder.encode(metas, vectors), ids, vectors))
    return out
