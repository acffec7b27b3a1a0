"""Figures in the docs that cannot drift unnoticed.

Two rules, both checked by tests/unit/test_docs_figures.py:

1. **Generated tables.** A region between ``<!-- generated: PATH -->`` and ``<!-- /generated -->``
   must equal the file PATH, which the measuring command writes (``make images`` writes
   ``docs/generated/images.md``). Measuring again and not copying the table fails the suite.
2. **Every measured figure names its source.** A section (heading to heading) that states a size, a
   time or a rate outside code blocks names the command that measured it (in backticks: ``embedstream
   ...``, ``make ...``, ``pytest ...``, a test file, a script) or the commit it was measured on. A
   section whose numbers are settings or defaults, not measurements, says so with
   ``<!-- figures: settings -->``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GENERATED = re.compile(r"<!-- generated: (?P<path>\S+) -->\n(?P<body>.*?)<!-- /generated -->", re.S)
SETTINGS = "<!-- figures: settings -->"
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
FIGURE = re.compile(
    r"(?<![\w.])\d[\d,.]*(?:\s?(?:MB|GB|MiB|GiB|KB|KiB|ms|msg/s|images/s|sentences/s|windows/s|rows/s|records/s)"
    r"|\s(?:s|min|minutes|seconds))(?![\w/])"
)
COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")
COMMAND = re.compile(
    r"`(?:\.venv/bin/)?(?:embedstream|make|pytest|python|podman|docker|deploy/|tests/|examples/)[^`]*`"
)


@dataclass(frozen=True)
class Section:
    doc: Path
    heading: str
    text: str

    def figures(self) -> list[str]:
        prose = GENERATED.sub("", _FENCE.sub("", self.text))
        return FIGURE.findall(prose)

    def names_its_source(self) -> bool:
        runnable = "```bash" in self.text  # the block that measured it, run by the docs runner
        return bool(COMMIT.search(self.text) or COMMAND.search(self.text)) or SETTINGS in self.text or runnable


def sections(doc: Path) -> list[Section]:
    text = _FENCE.sub(lambda m: m.group(0).replace("\n#", "\n "), doc.read_text(encoding="utf-8"))
    parts = re.split(r"\n(?=#{1,6} )", text)
    return [Section(doc, p.splitlines()[0] if p else "", p) for p in parts]


def unsourced(doc: Path) -> list[str]:
    return [
        f"{doc.name}: '{s.heading}': {s.figures()[:4]}"
        for s in sections(doc)
        if s.figures() and not s.names_its_source()
    ]


def stale_tables(doc: Path, root: Path) -> list[str]:
    """Generated regions that differ from the file their measuring command wrote."""
    stale = []
    for m in GENERATED.finditer(doc.read_text(encoding="utf-8")):
        source = root / m["path"]
        if not source.is_file():
            stale.append(f"{doc.name}: {m['path']} does not exist")
        elif source.read_text(encoding="utf-8").strip() != m["body"].strip():
            stale.append(f"{doc.name}: the table differs from {m['path']}; copy the file in (it is what was measured)")
    return stale
