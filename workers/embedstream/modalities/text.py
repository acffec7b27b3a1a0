"""Text: UTF-8 bytes (raw or in a JSON envelope) -> token ids, padded per batch to its longest text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedstream.config import Settings
from embedstream.decode.text import DecodedText, TextTokenizer, decode_text, decode_texts
from embedstream.encoders import EncoderSpec
from embedstream.errors import ConfigError
from embedstream.modalities import register_modality
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import RowMeta


class TextModality:
    name = "text"

    def __init__(self, spec: EncoderSpec, settings: Settings) -> None:
        location, max_length = spec.extra.get("tokenizer"), spec.extra.get("max_length")
        if not location or not max_length:
            raise ConfigError(f"encoder {spec.name} names no tokenizer and max length (spec.extra)")
        # The tokenizer may come from the model hub only where the model itself may.
        self._tokenizer = TextTokenizer(
            str(location), int(max_length), local_files_only=settings.encoder.weights != "pretrained"
        )
        self._limits = settings.text

    def decode(self, msg: SourceMessage) -> DecodedText | BadRecord:
        return decode_text(msg, self._tokenizer, self._limits)

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[DecodedText | BadRecord]:
        return decode_texts(msgs, self._tokenizer, self._limits)

    def stack(self, items: Sequence[DecodedText]) -> tuple[np.ndarray, ...]:
        # Pad to this batch's longest text, not max_length: short texts then cost short sequences.
        length = max(len(it.input_ids) for it in items)
        ids = np.full((len(items), length), self._tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(items), length), dtype=np.int64)
        for row, it in enumerate(items):
            n = len(it.input_ids)
            ids[row, :n] = it.input_ids
            mask[row, :n] = 1
        return ids, mask

    def row(self, item: DecodedText) -> RowMeta:
        return RowMeta.of(item.source, item.id, item.event_time_ms, (item.truncated, item.token_count))


register_modality("text", TextModality)
