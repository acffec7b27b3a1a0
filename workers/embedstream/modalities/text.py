"""Text: UTF-8 (raw or in a JSON envelope, ``schemas/text-envelope.schema.json``) -> token ids for the model.

Guards run cheapest first: message size, UTF-8, envelope, blank text, then the tokenizer. Text
longer than the model's max length is truncated by the tokenizer (as sentence-transformers does)
and the row records it; only blank or undecodable text is dead-lettered. Blank means nothing to
read: empty, or only whitespace, control characters (NUL, DEL, C0/C1 controls) and invisible
format characters (zero-width spaces, byte-order marks). Each batch is padded
to its longest text.

The worker's loop runs the checks (``decode``); the tokenizer runs in ``prepare``, on the inference
thread, one call per batch: the Rust tokenizer releases the GIL, so one batch is tokenized while the
loop polls, checks and publishes others.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from embedstream.config import EncoderSettings, Settings, TextLimits
from embedstream.encoders import EncoderSpec, tokenizer_file
from embedstream.errors import ConfigError
from embedstream.lineage import CHARS, file_sha256
from embedstream.modalities import ModalityDefaults, ModalityTopics, OneRowPerMessage, register_modality
from embedstream.modalities._envelope import default_id, is_envelope, parse_object, read_meta
from embedstream.modalities._tokenizer import TextTokenizer, local_location
from embedstream.records import BadRecord, RowMeta, SourceMessage

ALLOWED_KEYS = frozenset({"id", "text", "event_time_ms", "metadata"})
FIELDS: tuple[pa.Field, ...] = (
    pa.field("truncated", pa.bool_(), nullable=False),
    pa.field("token_count", pa.int32(), nullable=False),
)


@dataclass(frozen=True)
class DecodedText:
    """Token ids ready for the model (int64, special tokens included, at most max_length) and their origin."""

    source: SourceMessage
    id: str
    event_time_ms: int
    input_ids: np.ndarray = field(repr=False)
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class CheckedText:
    """A message that passed the checks: its text, not tokenized yet (``TextModality.prepare`` does that)."""

    source: SourceMessage
    id: str
    event_time_ms: int
    text: str = field(repr=False)


def decode_text(msg: SourceMessage, tokenizer: TextTokenizer, limits: TextLimits) -> DecodedText | BadRecord:
    return decode_texts([msg], tokenizer, limits)[0]


def decode_texts(
    msgs: Sequence[SourceMessage], tokenizer: TextTokenizer, limits: TextLimits
) -> list[DecodedText | BadRecord]:
    """Each message checked on its own, then every good text tokenized in one call; results in input order."""
    return tokenize_texts([check_text(msg, limits) for msg in msgs], tokenizer)


def tokenize_texts(
    items: Sequence[CheckedText | DecodedText | BadRecord], tokenizer: TextTokenizer
) -> list[DecodedText | BadRecord]:
    """Every checked text tokenized in one call; what is already tokenized or bad passes through, in order."""
    out: list[CheckedText | DecodedText | BadRecord] = list(items)
    todo = [(i, it) for i, it in enumerate(items) if isinstance(it, CheckedText)]
    encoded: Sequence[tuple[np.ndarray, int, bool] | Exception]
    try:
        encoded = tokenizer.encode_many([it.text for _, it in todo])
    except Exception:  # the tokenizer is third-party code: find the text it fails on, fail only that record
        encoded = [_encode_one(tokenizer, it.text) for _, it in todo]
    for (i, it), enc in zip(todo, encoded, strict=True):
        if isinstance(enc, Exception):
            out[i] = BadRecord(it.source, "undecodable", f"tokenizer failed: {enc}", type(enc).__name__)
        else:
            out[i] = DecodedText(it.source, it.id, it.event_time_ms, *enc)
    return out  # type: ignore[return-value]  # every CheckedText was replaced by its result above


def _encode_one(tokenizer: TextTokenizer, text: str) -> tuple[np.ndarray, int, bool] | Exception:
    try:
        return tokenizer.encode(text)
    except Exception as exc:
        return exc


def check_text(msg: SourceMessage, limits: TextLimits) -> CheckedText | BadRecord:
    """Every check but the tokenizer's."""
    if not msg.value:
        return BadRecord(msg, "empty", "message value is empty")
    if len(msg.value) > limits.max_message_bytes:
        return BadRecord(msg, "oversize", f"{len(msg.value)} bytes > limit {limits.max_message_bytes}")
    try:
        # utf-8-sig: a leading byte-order mark is an encoding artefact, not text to embed.
        raw = msg.value.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return BadRecord(msg, "invalid_utf8", f"message value is not valid UTF-8: {exc}", "UnicodeDecodeError")
    parsed = _unwrap(msg, raw) if is_envelope(msg) else CheckedText(msg, default_id(msg), msg.timestamp_ms, raw)
    if isinstance(parsed, BadRecord):
        return parsed
    if _blank(parsed.text):
        return BadRecord(msg, "empty", "text is empty or only whitespace, control or format characters")
    return parsed


# Unicode categories that carry nothing to embed: controls (NUL, DEL, C0/C1) and invisible format
# characters (zero-width space/joiners, byte-order mark, direction marks).
_INVISIBLE = frozenset({"Cc", "Cf"})


def _blank(text: str) -> bool:
    """True when the text holds nothing but whitespace, control and format characters."""
    # Stops at the first visible character, which in real text is the first or second one.
    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text)


def _unwrap(msg: SourceMessage, raw: str) -> CheckedText | BadRecord:
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
    return CheckedText(msg, *meta, text)


class TextModality(OneRowPerMessage):
    name = "text"
    fields = FIELDS

    def __init__(self, spec: EncoderSpec, settings: Settings) -> None:
        location, max_length = spec.extra.get("tokenizer"), spec.extra.get("max_length")
        if not location or not max_length:
            raise ConfigError(f"encoder {spec.name} names no tokenizer and max length (spec.extra)")
        pad = spec.extra.get("pad_token_id")
        # The tokenizer may come from the model hub only where the model itself may.
        self._tokenizer = TextTokenizer(
            str(location),
            int(max_length),
            local_files_only=settings.encoder.weights != "pretrained",
            pad_token_id=None if pad is None else int(pad),
            arch=settings.encoder.arch,
        )
        self._limits = settings.text

    def decode(self, msg: SourceMessage) -> CheckedText | BadRecord:
        return check_text(msg, self._limits)

    def decode_many(self, msgs: Sequence[SourceMessage]) -> list[CheckedText | BadRecord]:
        return [check_text(msg, self._limits) for msg in msgs]

    def prepare(self, items: Sequence[CheckedText | DecodedText]) -> list[DecodedText | BadRecord]:
        return tokenize_texts(items, self._tokenizer)

    def stack(self, items: Sequence[CheckedText | DecodedText]) -> tuple[np.ndarray, ...]:
        """The batch's token ids and attention mask; texts not tokenized yet are tokenized here."""
        ready = self.prepare(items)
        bad = [it for it in ready if isinstance(it, BadRecord)]
        if bad:
            raise ValueError(f"{len(bad)} of {len(items)} texts cannot be tokenized: {bad[0].message}")
        return self._stack(ready)  # type: ignore[arg-type]  # no BadRecord left

    def _stack(self, items: Sequence[DecodedText]) -> tuple[np.ndarray, ...]:
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
        extra = {"truncated": item.truncated, "token_count": item.token_count}
        return RowMeta.of(item.source, item.id, item.event_time_ms, extra)


def served_problems(spec: EncoderSpec, encoder: EncoderSettings) -> list[str]:
    """The tokenizer this worker will use must be, byte for byte, the one the model was exported with.

    The worker tokenizes, so the served preprocessing fingerprint is only true if its ``tokenizer.json``
    is the exporter's; where the spec's path is absent here another directory may stand in for it.
    """
    want, location = spec.extra.get("tokenizer_sha256"), spec.extra.get("tokenizer")
    if not want or not location:
        return []
    try:
        path = tokenizer_file(local_location(str(location), encoder.arch), encoder.weights != "pretrained")
    except ConfigError:
        return []  # TextModality reports a tokenizer it cannot find, with its fix
    have = file_sha256(path)
    if have == want:
        return []
    return [f"tokenizer {path} has sha256 {have[:CHARS]}, the model was exported with {str(want)[:CHARS]}"]


DEFAULTS = ModalityDefaults(
    topics=ModalityTopics.named("text"),
    families=("transformer",),
    sections=("text",),
    encoder={"family": "transformer", "arch": "all-MiniLM-L6-v2"},
    unit="sentences",
)

register_modality("text", TextModality, FIELDS, served_problems, defaults=DEFAULTS)
