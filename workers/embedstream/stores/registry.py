"""The stores a sink can write into, each registered by its own module (``stores/*_store.py``).

A store module calls ``register_store`` when it is imported: its name (the ``sink`` subcommand),
a help line, how to open it from the settings, and its own command-line flags. The registry finds
the modules by their name, so adding a store is one module (and its settings in ``[sink]``); the
sink's loop, the CLI and the service loop over what registered. Nothing here imports a store's
library: a store opens it when the sink starts.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import Settings
    from embedstream.stores.base import Store


def _no_flags(parser: argparse.ArgumentParser) -> None:
    return None


def _no_command(args: argparse.Namespace) -> int | None:
    return None


@dataclass(frozen=True)
class StoreKind:
    name: str
    help: str
    open: Callable[[Settings], Store]
    add_flags: Callable[[argparse.ArgumentParser], None] = _no_flags
    # A command of the store's own that runs instead of the sink (``sink feast init DIR``): its exit
    # code, or None to run the sink.
    command: Callable[[argparse.Namespace], int | None] = _no_command


_STORES: dict[str, StoreKind] = {}


def register_store(kind: StoreKind) -> StoreKind:
    if kind.name in _STORES and _STORES[kind.name] is not kind:
        raise ConfigError(f"store {kind.name!r} is registered twice")
    _STORES[kind.name] = kind
    return kind


def _load_all() -> None:
    import embedstream.stores as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name.endswith("_store"):
            importlib.import_module(f"embedstream.stores.{module.name}")


def store_kinds() -> list[StoreKind]:
    """Every registered store, by name."""
    _load_all()
    return [_STORES[name] for name in sorted(_STORES)]


def store_kind(name: str) -> StoreKind:
    _load_all()
    if name not in _STORES:
        raise ConfigError(f"unknown store {name!r}; stores: {', '.join(sorted(_STORES))}")
    return _STORES[name]
