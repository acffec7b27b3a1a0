"""UTF-8 text (raw or in a JSON envelope, ``schemas/text-envelope.schema.json``) -> token ids for the model.

Guards run cheapest first: message size, UTF-8, envelope, blank text, then the tokenizer. Text
longer than the model's max length is truncated by the tokenizer (as sentence-transformers does)
and the row records it; only blank or undecodable text is dead-lettered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedstream.config import TextLimits
from embedstream.decode.envelope import default_id, is_envelope, parse_object, read_meta
from embedstream.records import BadRecord, SourceMessage

ALLOWED_KEYS = frozenset({"id", "text", "event_time_ms", "metadata"})
_PREFIX_MARGIN_TOKENS = 16


@dataclass(frozen=True)
class DecodedText:
    """Token ids ready for the model (int64, special tokens included, at most max_length) and their origin."""

    source: SourceMessage
    id: str
    event_time_ms: int
    input_ids: np.ndarray = field(repr=False)
    token_count: int
    truncated: bool


class TextTokenizer:
    """The model's fast tokenizer, truncating at the length the model was exported for."""

    def __init__(self, location: str, max_length: int, local_files_only: bool = True) -> None:
        from transformers import AutoTokenizer

        self.max_length = max_length
        self._tok: Any = AutoTokenizer.from_pretrained(location, local_files_only=local_files_only, use_fast=True)
        pad = self._tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> tuple[np.ndarray, int, bool]:
        """-> (token ids, token count before truncation, whether it was truncated)."""
        # verbose=False: an over-long text is expected here, not worth the tokenizer's warning.
        enc = self._tok(text, add_special_tokens=True, truncation=False, verbose=False, return_offsets_mapping=True)
        ids, count = enc["input_ids"], len(enc["input_ids"])
        if count <= self.max_length:
            return np.asarray(ids, dtype=np.int64), count, False
        # The tokenizer truncates, so special tokens land exactly where sentence-transformers puts them; it
        # gets only a prefix reaching a margin past the last token that can survive, not the whole (up to
        # 1 MiB) text again. Special tokens have empty offsets and are skipped.
        ends = [end for start, end in enc["offset_mapping"] if end > start]
        cut = ends[min(len(ends) - 1, self.max_length + _PREFIX_MARGIN_TOKENS)]
        ids = self._tok(text[:cut], add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        if len(ids) < self.max_length:  # a prefix that tokenized differently: pay for the whole text
            ids = self._tok(text, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        return np.asarray(ids, dtype=np.int64), count, True


@dataclass(frozen=True)
class _Text:
    text: str
    id: str
    event_time_ms: int


def decode_text(msg: SourceMessage, tokenizer: TextTokenizer, limits: TextLimits) -> DecodedText | BadRecord:
    if not msg.value:
        return BadRecord(msg, "empty", "message value is empty")
    if len(msg.value) > limits.max_message_bytes:
        return BadRecord(msg, "oversize", f"{len(msg.value)} bytes > limit {limits.max_message_bytes}")
    try:
        # utf-8-sig: a leading byte-order mark is an encoding artefact, not text to embed.
        raw = msg.value.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return BadRecord(msg, "invalid_utf8", f"message value is not valid UTF-8: {exc}", "UnicodeDecodeError")
    parsed = _unwrap(msg, raw) if is_envelope(msg) else _Text(raw, default_id(msg), msg.timestamp_ms)
    if isinstance(parsed, BadRecord):
        return parsed
    if not parsed.text.strip():
        return BadRecord(msg, "empty", "text is empty or only whitespace")
    try:
        ids, count, truncated = tokenizer.encode(parsed.text)
    except Exception as exc:  # the tokenizer is third-party code: its failure is this record's, not the worker's
        return BadRecord(msg, "undecodable", f"tokenizer failed: {exc}", type(exc).__name__)
    return DecodedText(msg, parsed.id, parsed.event_time_ms, ids, count, truncated)


def _unwrap(msg: SourceMessage, raw: str) -> _Text | BadRecord:
    """Read a text envelope; any deviation from the schema is a BadRecord."""
    doc = parse_object(msg, raw, ALLOWED_KEYS)
    if isinstance(doc, BadRecord):
        return doc
    text = doc.get("text")
    if not isinstance(text, str):
        return BadRecord(msg, "invalid_envelope", "JSON envelope: 'text' must be a string")
    meta = read_meta(msg, doc)
    if isinstance(meta, BadRecord):
        return meta
    return _Text(text, *meta)
