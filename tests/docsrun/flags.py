"""The ``embedstream`` commands of a shell block, parsed by the command's own argument parser.

A block that is not run (``external``, ``compose``, ``gpu``, ``suite``) is still held to the CLI: each
``embedstream`` invocation in it must parse (known subcommand, known flags, valid choices), so a
renamed flag fails the suite even in a block that needs a cluster to run.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass

_OPERATORS = frozenset({"&&", "||", "|", ";", "&"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PROGRAM = re.compile(r"(^|/)embedstream$")


@dataclass(frozen=True)
class Invocation:
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return "embedstream " + shlex.join(self.argv)


def logical_lines(script: str) -> list[str]:
    """Lines with backslash continuations joined, and a quote that spans lines (``python -c '...'``)
    kept in one; comments are left to shlex."""
    lines: list[str] = []
    pending = ""
    for line in script.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        lines.append(pending)
        pending = ""
    return [*lines, pending] if pending else lines


def invocations(script: str) -> list[Invocation]:
    found: list[Invocation] = []
    for line in logical_lines(script):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenting = True
        words = list(lexer)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in _OPERATORS or set(word) <= set("&|;"):
                _take(command, found)
                command = []
            else:
                command.append(word)
    return found


_REDIRECTS = frozenset({">", ">>", "<", ">&", "&>", ">|", "<<", "<<<"})


def _without_redirections(words: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word in _REDIRECTS:
            skip = True  # and its target
        elif word.isdigit() and i + 1 < len(words) and words[i + 1] in _REDIRECTS:
            pass  # the fd of `2>`
        else:
            kept.append(word)
    return kept


def _take(command: list[str], found: list[Invocation]) -> None:
    command = _without_redirections(command)
    while command and _ASSIGNMENT.match(command[0]):
        command = command[1:]
    if command and command[0] == "exec":
        command = command[1:]
    if command and _PROGRAM.search(command[0]):
        found.append(Invocation(tuple(command[1:])))
    elif len(command) >= 3 and command[1:3] == ["-m", "embedstream"]:
        found.append(Invocation(tuple(command[3:])))


def parse_error(invocation: Invocation) -> str | None:
    """None when ``embedstream``'s own parser accepts the arguments, else what it said."""
    from embedstream.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(list(invocation.argv))
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None
