"""Fenced blocks of the user docs, each with what it needs to run.

Parsed with markdown-it-py (CommonMark, the parser GitHub-style renderers follow), so a fence inside a
list item or a block quote is found as a reader sees it, and each block knows its line. mktestdocs and
pytest-markdown-docs collect Python blocks only and read no annotation, hence this small collector.

An annotation is an HTML comment on the line before the fence (invisible when rendered)::

    <!-- docs-run: stack -->
    <!-- docs-run: external: a SASL broker of your own -->
    <!-- docs-run: stack xfail: Rollout as documented, on any Triton (#38) -->

Kinds:

- ``fresh``: needs nothing running; runs in a fresh working directory.
- ``stack``: runs against a running ``embedstream up`` (the runner starts one; the block reads its
  addresses from ``.embedstream/stack.env``, which ``up`` writes).
- ``background``: a long-running command (a sink) started for the doc's later blocks, as a user
  starts it in a second shell; ``background: wait REGEX`` waits for a line of its output first. It
  must still run when the doc's last block is done, and stop cleanly on Ctrl-C (SIGINT).
- ``up``: a block that starts ``embedstream up`` itself, run as ``background`` until its ``ready:``
  line; the doc's later blocks use that stack (the doc gets no runner stack).
- ``suite``: the test suite or one of its tests (``make test``, ``pytest tests/faults``); CI runs
  it, so the suite does not run itself. The reason names where it runs.
- ``compose``: the container tier (``make compose-test``).
- ``gpu``: the GPU run (``deploy/gpu/``); its CPU dry run is ``deploy/gpu/rehearse.sh``.
- ``external``: needs what a user brings (a cluster, a registry, a broker with SASL): checked for
  shell syntax and for flags each ``embedstream`` subcommand accepts, not run.

Every kind but ``fresh``, ``stack``, ``background`` and ``up`` needs a reason. ``xfail: REASON``
after the kind marks a block that is known to fail until the issue it names is fixed: it is still run,
and the run reports it as an expected failure (never a skip).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = frozenset({"bash", "sh", "console", "shell"})
RUN_LANGS = SHELL_LANGS | {"python"}
# Languages whose blocks are data or output, never commands.
DATA_LANGS = frozenset({"toml", "text", "json", "yaml", "ini", "promql", "csv"})
RUN_KINDS = frozenset({"fresh", "stack", "background", "up"})
OTHER_KINDS = frozenset({"suite", "compose", "gpu", "external"})
KINDS = RUN_KINDS | OTHER_KINDS

_ANNOTATION = re.compile(r"^<!--\s*docs-run:\s*(?P<body>.*?)\s*-->\s*$")
_KIND = re.compile(r"^(?P<kind>[a-z]+)(?:\s*:\s*(?P<reason>.*?))?(?:\s+xfail\s*:\s*(?P<xfail>.+))?$")


class AnnotationError(ValueError):
    """A block's annotation is missing, unknown or incomplete."""


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    annotation: str | None  # the comment's body, None where there is none

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc}:{self.line}"

    @property
    def runs_code(self) -> bool:
        return self.lang in RUN_LANGS

    def need(self) -> Need:
        return parse_annotation(self.annotation, self.where)

    def kind(self) -> str | None:
        """The annotated kind, or None where the annotation is missing or wrong (a unit test names it)."""
        try:
            return self.need().kind
        except AnnotationError:
            return None


@dataclass(frozen=True)
class Need:
    kind: str
    reason: str
    xfail: str | None = None


def parse_annotation(body: str | None, where: str) -> Need:
    if body is None:
        raise AnnotationError(f"{where}: no '<!-- docs-run: KIND -->' on the line before the block")
    m = _KIND.match(body)
    if m is None or m["kind"] not in KINDS:
        raise AnnotationError(f"{where}: unknown annotation {body!r}; kinds: {', '.join(sorted(KINDS))}")
    reason = (m["reason"] or "").strip()
    if m["kind"] in OTHER_KINDS and not reason:
        raise AnnotationError(f"{where}: a {m['kind']!r} block says why it is not run here ('{m['kind']}: REASON')")
    return Need(m["kind"], reason, (m["xfail"] or "").strip() or None)


def user_docs(root: Path = ROOT) -> list[Path]:
    """The docs a user reads: README.md and docs/*.md (schemas/README.md holds no commands)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def collect(doc: Path) -> Iterator[Block]:
    text = doc.read_text(encoding="utf-8")
    lines = text.splitlines()
    for token in MarkdownIt("commonmark").parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start = token.map[0]
        annotation = None
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        if before >= 0 and (m := _ANNOTATION.match(lines[before].strip())):
            annotation = m["body"]
        lang = token.info.split()[0] if token.info.strip() else ""
        yield Block(doc, start + 1, lang, token.content, annotation)


def all_blocks(root: Path = ROOT) -> list[Block]:
    return [b for doc in user_docs(root) for b in collect(doc)]


def command_blocks(root: Path = ROOT) -> list[Block]:
    return [b for b in all_blocks(root) if b.runs_code]
