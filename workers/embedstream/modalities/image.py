"""Images: JPEG/PNG/WebP bytes (raw or in a JSON envelope) -> uint8 pixels at the model's input size."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embedstream.config import Settings
from embedstream.decode.image import decode_image
from embedstream.encoders import EncoderSpec
from embedstream.errors import ConfigError
from embedstream.modalities import register_modality
from embedstream.records import BadRecord, DecodedImage, SourceMessage
from embedstream.sinks.arrow_codec import RowMeta


class ImageModality:
    name = "image"

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
        return RowMeta.of(item.source, item.id, item.event_time_ms, (item.source_width, item.source_height))


register_modality("image", ImageModality)
