"""Images: JPEG/PNG/WebP bytes (raw or in a JSON envelope) -> uint8 pixels at the model's input size.

Guards run before any pixel is decoded: message size, then the declared image size read from
the header, so a decompression bomb costs a header parse, not gigabytes of memory.

An image may also come by reference (``s3://bucket/key``, ``https://host/path``): the whole message
value, an envelope's ``uri``, or a mapped record field (``formats``). With ``fetch.enabled`` its fetch
starts as soon as the message is decoded, on the fetcher's threads (``embedstream.fetch``), which
decode the pixels too; ``prepare``, on the inference thread, waits for the batch's fetches, so they
overlap the inference of the batches before. A fetch's failure is the message's dead letter
(``fetch_*`` reasons); a store that does not answer raises ``SourceUnavailable``, and the worker
holds the batch until a probe finds the store back.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from embedstream.config import ImageLimits, Settings
from embedstream.encoders import EncoderSpec, ImagePreprocessing
from embedstream.errors import ConfigError, SourceUnavailable
from embedstream.fetch.outcomes import Away, Failed
from embedstream.fetch.references import looks_like_reference
from embedstream.modalities import ModalityDefaults, ModalityTopics, OneRowPerMessage, register_modality
from embedstream.modalities._envelope import (
    ALLOWED_KEYS,
    default_id,
    is_envelope,
    parse_object,
    read_meta,
    unwrap_object,
)
from embedstream.records import BadRecord, Reason, RowMeta, SourceMessage

if TYPE_CHECKING:
    from embedstream.fetch.fetcher import Fetcher

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
    source_uri: str | None = None


@dataclass
class PendingImage:
    """An image by reference whose fetch (and decode, on the fetch thread) is under way."""

    source: SourceMessage
    id: str
    event_time_ms: int
    uri: str
    future: Future[Any] = field(repr=False)


@dataclass(frozen=True)
class _Inline:
    data: bytes
    id: str
    event_time_ms: int


@dataclass(frozen=True)
class _Referenced:
    uri: str
    id: str
    event_time_ms: int


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def decode_image(msg: SourceMessage, prep: ImagePreprocessing, limits: ImageLimits) -> DecodedImage | BadRecord:
    """An inline image's pixels; a reference is a ``fetch_refused`` dead letter here (ImageModality fetches)."""
    found = read_input(msg, limits)
    if isinstance(found, BadRecord):
        return found
    if isinstance(found, _Referenced):
        return BadRecord(msg, "fetch_refused", "images by reference are not fetched here (fetch.enabled is false)")
    return pixels_of(msg, found.data, found.id, found.event_time_ms, prep, limits)


def read_input(msg: SourceMessage, limits: ImageLimits) -> _Inline | _Referenced | BadRecord:
    """The image's bytes or its reference, with the id and event time (from the envelope, else the message)."""
    if not msg.value:
        return BadRecord(msg, "empty", "message value is empty")
    if len(msg.value) > limits.max_message_bytes:
        return BadRecord(msg, "oversize", f"{len(msg.value)} bytes > limit {limits.max_message_bytes}")
    if is_envelope(msg):
        doc = parse_object(msg, msg.value, ALLOWED_KEYS)
        if isinstance(doc, BadRecord):
            return doc
        if "uri" in doc:
            return _envelope_reference(msg, doc)
        unwrapped = unwrap_object(msg, doc)
        if isinstance(unwrapped, BadRecord):
            return unwrapped
        return _Inline(unwrapped.payload, unwrapped.id, unwrapped.event_time_ms)
    if looks_like_reference(msg.value):
        try:
            return _Referenced(msg.value.decode("ascii"), default_id(msg), msg.timestamp_ms)
        except UnicodeDecodeError:
            return BadRecord(msg, "fetch_failed", "a reference must be ASCII (percent-encode the rest)")
    return _Inline(msg.value, default_id(msg), msg.timestamp_ms)


def _envelope_reference(msg: SourceMessage, doc: dict[str, Any]) -> _Referenced | BadRecord:
    uri = doc["uri"]
    if "image" in doc:
        return BadRecord(msg, "invalid_envelope", "JSON envelope: give 'image' or 'uri', not both")
    if not isinstance(uri, str) or not uri:
        return BadRecord(msg, "invalid_envelope", "JSON envelope: 'uri' must be a non-empty string")
    meta = read_meta(msg, doc)
    if isinstance(meta, BadRecord):
        return meta
    return _Referenced(uri, meta[0], meta[1])


def pixels_of(
    msg: SourceMessage,
    data: bytes,
    ident: str,
    event_time: int,
    prep: ImagePreprocessing,
    limits: ImageLimits,
    uri: str | None = None,
) -> DecodedImage | BadRecord:
    """Guards, decode, resize and crop; any failure is the message's BadRecord."""
    try:
        pixels, width, height = _pixels(data, prep, limits)
    except _Rejected as rej:
        return BadRecord(msg, rej.reason, str(rej))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return BadRecord(msg, "decompression_bomb", str(exc), type(exc).__name__)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return BadRecord(msg, "undecodable", f"cannot decode image: {exc}", type(exc).__name__)
    return DecodedImage(msg, ident, event_time, pixels, width, height, uri)


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

    def __init__(self, spec: EncoderSpec, settings: Settings, fetcher: Fetcher | None = None) -> None:
        if spec.preprocessing is None:
            raise ConfigError(f"encoder {spec.name} has no image preprocessing")
        self._prep = spec.preprocessing
        self._limits = settings.limits
        threads = settings.batch.decode_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        if fetcher is None and settings.fetch.enabled:
            from embedstream.fetch.fetcher import Fetcher

            fetcher = Fetcher(settings.fetch)
        self._fetcher = fetcher

    def decode(self, msg: SourceMessage) -> DecodedImage | PendingImage | BadRecord:
        found = read_input(msg, self._limits)
        if isinstance(found, BadRecord):
            return found
        if isinstance(found, _Referenced):
            if self._fetcher is None:
                return BadRecord(
                    msg, "fetch_refused", "images by reference are not fetched here (fetch.enabled is false)"
                )
            pending = PendingImage(msg, found.id, found.event_time_ms, found.uri, None)  # type: ignore[arg-type]
            pending.future = self._fetch(pending)
            return pending
        return pixels_of(msg, found.data, found.id, found.event_time_ms, self._prep, self._limits)

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[DecodedImage | PendingImage | BadRecord]:
        if self._pool is None or len(msgs) < 2:
            return [self.decode(m) for m in msgs]
        return list(self._pool.map(self.decode, msgs))

    def prepare(self, items: Sequence[DecodedImage | PendingImage]) -> list[DecodedImage | BadRecord]:
        """Wait for the batch's fetches; a store that did not answer is fetched from once more, then held."""
        pending = [it for it in items if isinstance(it, PendingImage)]
        if not pending:
            return list(items)  # type: ignore[arg-type]  # all decoded already
        again = [it for it in pending if isinstance(it.future.result(), Away)]
        for it in again:  # the batch may have been held through an outage: those fetches failed before it ended
            it.future = self._fetch(it)
        away = [r for r in (it.future.result() for it in again) if isinstance(r, Away)]
        if away:
            raise SourceUnavailable(away[0].message)
        out: list[DecodedImage | BadRecord] = []
        for item in items:
            if not isinstance(item, PendingImage):
                out.append(item)
                continue
            result = item.future.result()
            if isinstance(result, Failed):
                out.append(BadRecord(item.source, result.reason, result.message, result.error_class))  # type: ignore[arg-type]
            else:
                out.append(result)
        return out

    def stack(self, items: Sequence[DecodedImage]) -> tuple[np.ndarray, ...]:
        return (np.stack([it.pixels for it in items]),)

    def row(self, item: DecodedImage) -> RowMeta:
        extra = {"source_width": item.source_width, "source_height": item.source_height, "source_uri": item.source_uri}
        return RowMeta.of(item.source, item.id, item.event_time_ms, extra)

    def sources_ready(self) -> bool:
        """Whether the object stores this worker fetched from answer (the outage probe)."""
        return self._fetcher is None or self._fetcher.ready()

    def _fetch(self, it: PendingImage) -> Future[Any]:
        assert self._fetcher is not None
        msg, prep, limits = it.source, self._prep, self._limits
        return self._fetcher.submit(
            it.uri, lambda data: pixels_of(msg, data, it.id, it.event_time_ms, prep, limits, it.uri)
        )


DEFAULTS = ModalityDefaults(
    # KafkaSettings' defaults (and produce-samples' topic), so the image pipeline has the same topics
    # whether or not a config is given.
    topics=ModalityTopics.named("image", input_topic="images"),
    families=("cnn",),
    sections=("limits",),
    unit="images",
)

register_modality("image", ImageModality, FIELDS, defaults=DEFAULTS)
