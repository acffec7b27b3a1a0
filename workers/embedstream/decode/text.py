"""UTF-8 text (raw or in a JSON envelope, ``schemas/text-envelope.schema.json``) -> token ids for the model.

Guards run cheapest first: message size, UTF-8, envelope, blank text, then the tokenizer. Text
longer than the model's max length is truncated by the tokenizer (as sentence-transformers does)
and the row records it; only blank or undecodable text is dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        # The Rust tokenizer underneath, on a copy of its own: the transformers wrapper costs more per call
        # than tokenizing a sentence, and it re-configures truncation on the tokenizer it shares.
        self._rust: Any = type(self._tok.backend_tokenizer).from_str(self._tok.backend_tokenizer.to_str())
        self._rust.no_truncation()
        self._rust.no_padding()

    def encode(self, text: str) -> tuple[np.ndarray, int, bool]:
        """-> (token ids, token count before truncation, whether it was truncated)."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[tuple[np.ndarray, int, bool]]:
        """Many texts in one call into the tokenizer (which spreads them over its threads)."""
        out = []
        for text, enc in zip(texts, self._rust.encode_batch(list(texts), add_special_tokens=True), strict=True):
            if len(enc.ids) <= self.max_length:
                out.append((np.asarray(enc.ids, dtype=np.int64), len(enc.ids), False))
            else:
                out.append((self._truncated(text, enc.offsets), len(enc.ids), True))
        return out

    def _truncated(self, text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
        # The tokenizer truncates, so special tokens land exactly where sentence-transformers puts them; it
        # gets only a prefix reaching a margin past the last token that can survive, not the whole (up to
        # 1 MiB) text again. Special tokens have empty offsets and are skipped.
        ends = [end for start, end in offsets if end > start]
        cut = ends[min(len(ends) - 1, self.max_length + _PREFIX_MARGIN_TOKENS)]
        ids = self._tok(text[:cut], add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        if len(ids) < self.max_length:  # a prefix that tokenized differently: pay for the whole text
            ids = self._tok(text, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        return np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True)
class _Text:
    text: str
    id: str
    event_time_ms: int


def decode_text(msg: SourceMessage, tokenizer: TextTokenizer, limits: TextLimits) -> DecodedText | BadRecord:
    return decode_texts([msg], tokenizer, limits)[0]


def decode_texts(
    msgs: Sequence[SourceMessage], tokenizer: TextTokenizer, limits: TextLimits
) -> list[DecodedText | BadRecord]:
    """Each message checked on its own, then every good text tokenized in one call; results in input order."""
    out: list[DecodedText | BadRecord | _Text] = [_text_of(msg, limits) for msg in msgs]
    good = [i for i, t in enumerate(out) if isinstance(t, _Text)]
    texts: list[_Text] = [out[i] for i in good]  # type: ignore[misc]
    try:
        encoded = tokenizer.encode_many([t.text for t in texts])
    except Exception:  # the tokenizer is third-party code: find the text it fails on, fail only that record
        encoded = [_encode_one(tokenizer, t.text) for t in texts]
    for i, t, enc in zip(good, texts, encoded, strict=True):
        msg = msgs[i]
        if isinstance(enc, Exception):
            out[i] = BadRecord(msg, "undecodable", f"tokenizer failed: {enc}", type(enc).__name__)
        else:
            out[i] = DecodedText(msg, t.id, t.event_time_ms, *enc)
    return out  # type: ignore[return-value]


def _encode_one(tokenizer: TextTokenizer, text: str) -> tuple[np.ndarray, int, bool] | Exception:
    try:
        return tokenizer.encode(text)
    except Exception as exc:
        return exc


def _text_of(msg: SourceMessage, limits: TextLimits) -> _Text | BadRecord:
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
    return parsed


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
