"""Encoder families register themselves here; the CLI and tests look them up by name."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedstream.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from embedstream.config import Settings
    from embedstream.encoders._spec import EncoderSpec


@dataclass(frozen=True)
class EncoderFamily:
    """How to describe and build the encoders of one family (cnn, transformer, ...).

    ``describe`` returns the spec without running the model; ``build`` returns the
    servable ``torch.nn.Module`` whose forward takes the spec's inputs and returns the
    embedding, preprocessing that belongs on the server (normalisation) included.
    """

    name: str
    describe: Callable[..., EncoderSpec]
    build: Callable[..., torch.nn.Module]
    example_inputs: Callable[[EncoderSpec, int], tuple[torch.Tensor, ...]]


_FAMILIES: dict[str, EncoderFamily] = {}
# Where each known family lives; importing the module registers it. Every public module of this
# package is a family of that name, so adding one is adding its file; the null family is a local tool.
_MODULES = {
    info.name: f"embedstream.encoders.{info.name}"
    for info in pkgutil.iter_modules([str(Path(__file__).parent)])
    if not info.name.startswith("_")
} | {"null": "embedstream.local.null_encoder"}


def register_family(family: EncoderFamily) -> EncoderFamily:
    if family.name in _FAMILIES:
        raise ConfigError(f"encoder family {family.name!r} registered twice")
    _FAMILIES[family.name] = family
    return family


def require_known(name: str) -> None:
    """Fail on a family nobody registered or listed, without importing any family module."""
    if name not in _FAMILIES and name not in _MODULES:
        known = ", ".join(list_families()) or "none"
        raise ConfigError(f"unknown encoder family {name!r} (known: {known})")


def get_family(name: str) -> EncoderFamily:
    require_known(name)
    if name not in _FAMILIES:
        importlib.import_module(_MODULES[name])
    return _FAMILIES[name]


def list_families() -> list[str]:
    return sorted(set(_FAMILIES) | set(_MODULES))


def describe(settings: Settings) -> EncoderSpec:
    """The spec the exporter writes, computed by the family itself (which imports its network library).

    Workers read the spec from the served model instead (``TritonBackend.for_served_model``); this is
    for the exporter and the local tools that run the model in-process.
    """
    return get_family(settings.encoder.family).describe(settings.encoder)
