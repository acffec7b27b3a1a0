"""The ``embedstream`` command. Every flag falls back to an environment variable, shown in --help."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from embedstream.cli_support import Commands, flag, setup_logging
from embedstream.errors import EmbedstreamError

log = logging.getLogger("embedstream")

# Command groups that live beside their code, in the order --help lists them: each module's
# ``register(subparsers)`` adds its subcommands and returns their handlers. A new command goes into its
# group's module; a new group is one more line here. Handlers import what they run only when called, so
# building the parser loads no model, stack or store code.
COMMAND_MODULES: tuple[str, ...] = (
    "embedstream.serving_cli",
    "embedstream.local.cli",
    "embedstream.training.cli",
    "embedstream.ops.cli",
    "embedstream.local.bench.cli",
    "embedstream.stores.cli",
    "embedstream.rollout.cli",
)

COMMANDS: Commands = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedstream", description=__doc__)
    flag(parser, "--log-level", "LOG_LEVEL", "logging level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module).register(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except EmbedstreamError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
