"""Images: JPEG/PNG/WebP bytes (raw or in a JSON envelope) -> uint8 pixels at the model's input size.

Guards run before any pixel is decoded: message size, then the declared image size read from
the header, so a decompression bomb costs a header parse, not gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from embedstream.config import ImageLimits, Settings
from embedstream.encoders import EncoderSpec, ImagePreprocessing
from embedstream.errors import ConfigError
from embedstream.modalities import ModalityDefaults, ModalityTopics, OneRowPerMessage, register_modality
from embedstream.modalities._envelope import default_id, is_envelope, unwrap
from embedstream.records import BadRecord, Reason, RowMeta, SourceMessage

FIELDS: tuple[pa.Field, ...] = (
    pa.field("source_width", pa.int32(), nullable=False),
    pa.field("source_height", pa.int32(), nullable=False),
)


@dataclass(frozen=True)
class DecodedImage:
    """Pixels ready for the model (uint8, H x W x 3) and where they came from."""

    source: SourceMessage
    id: str
    event_time_ms: int
    pixels: np.ndarray = field(repr=False)
    source_width: int
    source_height: int


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def decode_image(msg: SourceMessage, prep: ImagePreprocessing, limits: ImageLimits) -> DecodedImage | BadRecord:
    if not msg.value:
        return BadRecord(msg, "empty", "message value is empty")
    if len(msg.value) > limits.max_message_bytes:
        return BadRecord(msg, "oversize", f"{len(msg.value)} bytes > limit {limits.max_message_bytes}")
    if is_envelope(msg):
        unwrapped = unwrap(msg)
        if isinstance(unwrapped, BadRecord):
            return unwrapped
        data, ident, event_time = unwrapped.payload, unwrapped.id, unwrapped.event_time_ms
    else:
        data, ident, event_time = msg.value, default_id(msg), msg.timestamp_ms
    try:
        pixels, width, height = _pixels(data, prep, limits)
    except _Rejected as rej:
        return BadRecord(msg, rej.reason, str(rej))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return BadRecord(msg, "decompression_bomb", str(exc), type(exc).__name__)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return BadRecord(msg, "undecodable", f"cannot decode image: {exc}", type(exc).__name__)
    return DecodedImage(msg, ident, event_time, pixels, width, height)


class _Rejected(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _pixels(data: bytes, prep: ImagePreprocessing, limits: ImageLimits) -> tuple[np.ndarray, int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img: Image.Image = Image.open(io.BytesIO(data))
        if img.format not in limits.formats:
            raise _Rejected("unsupported_format", f"format {img.format} not in {list(limits.formats)}")
        width, height = img.size
        if width * height > limits.max_pixels or max(width, height) > limits.max_side:
            raise _Rejected(
                "decompression_bomb",
                f"declared size {width}x{height} exceeds limits ({limits.max_pixels} px, side {limits.max_side})",
            )
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, but keep at least twice the target: drafting
            # straight to the target skips the resampling filter the encoder's reference transform
            # (timm's, from full resolution) applies, which moved embeddings to cosine 0.97.
            draft = 2 * prep.resize_shorter_to
            img.draft("RGB", (draft, draft))
        img = img.convert("RGB")
    return _resize_center_crop(img, prep), width, height


def _resize_center_crop(img: Image.Image, prep: ImagePreprocessing) -> np.ndarray:
    """Resize the shorter side to ``resize_shorter_to``, then centre-crop, in one resampling pass.

    Sizes and offsets follow torchvision's ``Resize`` and ``CenterCrop`` (the longer side truncated,
    the crop offset rounded), the transform timm builds for its models, so the embedding matches the
    reference one. Only the crop's pixels are computed: the crop box is mapped back to source
    coordinates with the per-axis scales of the full resize, at about 60% of the cost of both steps.
    """
    w, h = img.size
    s = prep.resize_shorter_to
    new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    new_w, new_h = max(prep.width, new_w), max(prep.height, new_h)
    left, top = round((new_w - prep.width) / 2.0), round((new_h - prep.height) / 2.0)
    if (new_w, new_h) == (w, h):
        img = img.crop((left, top, left + prep.width, top + prep.height))
    else:
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + prep.width) * sx, (top + prep.height) * sy)
        img = img.resize(
            (prep.width, prep.height), _RESAMPLE.get(prep.interpolation, Image.Resampling.BILINEAR), box=box
        )
    return np.asarray(img, dtype=np.uint8)


class ImageModality(OneRowPerMessage):
    name = "image"
    fields = FIELDS

    def __init__(self, spec: EncoderSpec, settings: Settings) -> None:
        if spec.preprocessing is None:
            raise ConfigError(f"encoder {spec.name} has no image preprocessing")
        self._prep = spec.preprocessing
        self._limits = settings.limits
        threads = settings.batch.decode_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def decode(self, msg: SourceMessage) -> DecodedImage | BadRecord:
        return decode_image(msg, self._prep, self._limits)

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[DecodedImage | BadRecord]:
        if self._pool is None or len(msgs) < 2:
            return [self.decode(m) for m in msgs]
        return list(self._pool.map(self.decode, msgs))

    def stack(self, items: Sequence[DecodedImage]) -> tuple[np.ndarray, ...]:
        return (np.stack([it.pixels for it in items]),)

    def row(self, item: DecodedImage) -> RowMeta:
        extra = {"source_width": item.source_width, "source_height": item.source_height}
        return RowMeta.of(item.source, item.id, item.event_time_ms, extra)


DEFAULTS = ModalityDefaults(
    # KafkaSettings' defaults (and produce-samples' topic), so the image pipeline has the same topics
    # whether or not a config is given.
    topics=ModalityTopics.named("image", input_topic="images"),
    families=("cnn",),
    sections=("limits",),
    unit="images",
)

register_modality("image", ImageModality, FIELDS, defaults=DEFAULTS)
