"""The docs' figures name what measured them, and generated tables equal what the measuring command wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.docsrun.blocks import ROOT, user_docs
from tests.docsrun.figures import GENERATED, stale_tables, unsourced

DOCS = user_docs()


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_measured_figure_names_its_command_or_commit(doc: Path) -> None:
    assert not unsourced(doc), "\n".join(unsourced(doc))


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_generated_tables_equal_the_file_their_command_wrote(doc: Path) -> None:
    assert not stale_tables(doc, ROOT), "\n".join(stale_tables(doc, ROOT))


def test_the_image_table_is_generated_by_make_images() -> None:
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    assert [m["path"] for m in GENERATED.finditer(deployment)] == ["docs/generated/images.md"]
    assert "docs/generated/images.md" in (ROOT / "deploy" / "containers" / "build-images.sh").read_text()


def test_a_stale_figure_fails_the_check(tmp_path: Path) -> None:
    """A new `make images` run rewrote the table; the doc still shows the old size."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    table = tmp_path / "docs" / "generated" / "images.md"
    table.write_text(table.read_text().replace("| 501 MB |", "| 517 MB |"))
    assert stale_tables(tmp_path / "docs" / "deployment.md", tmp_path) == [
        "deployment.md: the table differs from docs/generated/images.md; copy the file in (it is what was measured)"
    ]


def test_a_figure_without_its_source_fails_the_check(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# T\n\n## Speed\n\nThe worker embeds 412 images/s and starts in 3.9 s.\n")
    assert unsourced(doc) == ["doc.md: '## Speed': ['412 images/s', '3.9 s']"]
    doc.write_text("# T\n\n## Speed\n\nMeasured with `embedstream bench` at cee7e64: 412 images/s.\n")
    assert unsourced(doc) == []
    doc.write_text("# T\n\n## Limits\n<!-- figures: settings -->\n\n`max_bytes` defaults to 10 MiB.\n")
    assert unsourced(doc) == []
