"""The encoder spec: one frozen description from which everything else derives.

The Triton ``config.pbtxt``, the worker's preprocessing, the start-up check of the
served model and the Arrow output schema are all computed from an :class:`EncoderSpec`,
so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

TritonDType = Literal["UINT8", "INT32", "INT64", "FP32", "BOOL"]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output, without the batch dimension.

    For outputs after the first (the embedding), ``column`` names the per-row Arrow column the
    value lands in (e.g. an autoencoder's ``reconstruction_error``); such outputs have dims ``(1,)``.
    """

    name: str
    dtype: TritonDType
    dims: tuple[int, ...]
    column: str | None = None


@dataclass(frozen=True)
class ImagePreprocessing:
    """How the worker turns decoded pixels into the uint8 tensor the model takes.

    Normalisation (mean/std) happens inside the served model, so only uint8 crosses the wire.
    """

    height: int
    width: int
    resize_shorter_to: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything the pipeline needs to know about one served encoder."""

    name: str
    version: str
    modality: str  # a name in embedstream.modalities.MODALITIES
    family: str
    source: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    embedding_dim: int
    max_batch_size: int
    preprocessing: ImagePreprocessing | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Lineage (lineage.py): set by the exporter from the module it serves; None in a spec
    # that was only described, or read from a model exported before fingerprints existed.
    weights_sha256: str | None = None
    preprocessing_sha256: str | None = None

    @property
    def embedding_output(self) -> TensorSpec:
        return self.outputs[0]

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes | str) -> EncoderSpec:
        data = orjson.loads(raw)
        prep = data.pop("preprocessing")
        return cls(
            **{
                **data,
                "inputs": tuple(_tensor(t) for t in data["inputs"]),
                "outputs": tuple(_tensor(t) for t in data["outputs"]),
                "preprocessing": _image_prep(prep) if prep else None,
            }
        )


def _tensor(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=raw["name"], dtype=raw["dtype"], dims=tuple(raw["dims"]), column=raw.get("column"))


def _image_prep(raw: dict[str, Any]) -> ImagePreprocessing:
    return ImagePreprocessing(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
