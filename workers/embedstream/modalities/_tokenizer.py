"""The model's fast tokenizer, used by the text modality."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_PREFIX_MARGIN_TOKENS = 16


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
