"""Every fenced block of README.md and docs/*.md says what it needs, and every command in it parses.

The blocks themselves run in tests/integration/test_docs_run.py; here, without running anything:
each fence has a language (a command cannot hide in an untagged one), each shell and Python block an
annotation of a known kind (with a reason where it is not run), each shell block is valid bash, each
``embedstream`` invocation parses with the command's own parser, each Python block compiles, and each
``suite`` block names make targets and test paths that exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.docsrun.blocks import (
    DATA_LANGS,
    ROOT,
    RUN_KINDS,
    RUN_LANGS,
    SHELL_LANGS,
    AnnotationError,
    Block,
    all_blocks,
    collect,
    parse_annotation,
)
from tests.docsrun.flags import Invocation, invocations, parse_error
from tests.docsrun.runner import Workspace, run_doc

BLOCKS = all_blocks()
COMMANDS = [b for b in BLOCKS if b.runs_code]


def ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


@pytest.mark.parametrize("block", BLOCKS, ids=ids(BLOCKS))
def test_every_fence_names_its_language(block: Block) -> None:
    assert block.lang in RUN_LANGS | DATA_LANGS, (
        f"{block.where}: fence language {block.lang!r}; commands take bash or python (and an annotation), "
        f"output and data take one of {sorted(DATA_LANGS)}"
    )


@pytest.mark.parametrize("block", COMMANDS, ids=ids(COMMANDS))
def test_every_command_block_says_what_it_needs(block: Block) -> None:
    block.need()  # raises AnnotationError naming the block


SHELL = [b for b in COMMANDS if b.lang in SHELL_LANGS]
PYTHON = [b for b in COMMANDS if b.lang == "python"]


@pytest.mark.parametrize("block", SHELL, ids=ids(SHELL))
def test_every_shell_block_is_valid_bash(block: Block) -> None:
    done = subprocess.run(["bash", "-n"], input=block.text, text=True, capture_output=True)
    assert done.returncode == 0, f"{block.where}: {done.stderr}"


@pytest.mark.parametrize("block", PYTHON, ids=ids(PYTHON))
def test_every_python_block_compiles(block: Block) -> None:
    compile(block.text, block.where, "exec")


@pytest.mark.parametrize("block", SHELL, ids=ids(SHELL))
def test_every_embedstream_command_in_the_docs_parses(block: Block) -> None:
    """Also the blocks that need a cluster or a GPU: a renamed flag or subcommand fails here."""
    errors = [f"{inv}: {err}" for inv in invocations(block.text) if (err := parse_error(inv))]
    assert not errors, f"{block.where}:\n" + "\n".join(errors)


SUITE = [b for b in COMMANDS if b.kind() == "suite"]


@pytest.mark.parametrize("block", SUITE, ids=ids(SUITE))
def test_suite_blocks_name_targets_and_tests_that_exist(block: Block) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for line in block.text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["make"]:
            for target in words[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{block.where}: no make target {target!r}"
        for word in words:
            if word.startswith("tests/"):
                assert (ROOT / word).exists(), f"{block.where}: {word} does not exist"
    named = re.findall(r"tests/[\w/]+\.py", block.need().reason)
    assert all((ROOT / n).exists() for n in named), f"{block.where}: the reason names a missing test: {named}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_short_enough() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


def test_per_doc_summary_of_what_runs() -> None:
    """The summary the docs issue asks for (printed with -s): blocks per kind, and pasteable ones."""
    per_doc: dict[str, Counter[str]] = {}
    for b in COMMANDS:
        per_doc.setdefault(str(b.doc.relative_to(ROOT)), Counter())[b.need().kind] += 1
    for doc, kinds in per_doc.items():
        pasteable = sum(n for k, n in kinds.items() if k != "external")
        print(f"{doc:<24} {dict(kinds)}  pasteable as written: {pasteable}/{sum(kinds.values())}")
    readme = per_doc["README.md"]
    assert readme["external"] + sum(readme[k] for k in RUN_KINDS | {"suite"}) == sum(readme.values())


# The runner itself: a block it is given fails when a command in it fails.

BROKEN = """# A doc

<!-- docs-run: fresh -->
```bash
.venv/bin/embedstream config check --no-such-flag deploy/config/worker.image.toml
```
"""

FINE = BROKEN.replace(" --no-such-flag", "")


def _doc(tmp_path: Path, text: str) -> Path:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return doc


def test_a_wrong_flag_fails_the_parse_check(tmp_path: Path) -> None:
    (block,) = collect(_doc(tmp_path, BROKEN))
    (inv,) = invocations(block.text)
    assert inv == Invocation(("config", "check", "--no-such-flag", "deploy/config/worker.image.toml"))
    assert "unrecognized arguments: --no-such-flag" in (parse_error(inv) or "")
    (good,) = invocations(next(collect(_doc(tmp_path, FINE))).text)
    assert parse_error(good) is None


def test_the_runner_fails_a_broken_block_and_passes_the_fixed_one(tmp_path: Path) -> None:
    (broken,) = collect(_doc(tmp_path, BROKEN))
    (outcome,) = run_doc([broken], Workspace(tmp_path / "a").prepare(), timeout_s=120)
    assert not outcome.ok and "--no-such-flag" in outcome.output
    (fine,) = collect(_doc(tmp_path, FINE))
    (outcome,) = run_doc([fine], Workspace(tmp_path / "b").prepare(), timeout_s=120)
    assert outcome.ok, outcome.report()
    assert "[encoder]" in outcome.output


def test_blocks_of_one_doc_share_a_shell_and_a_fresh_directory(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "<!-- docs-run: fresh -->\n```bash\nexport GREETING=hello\nmkdir out && cd out\n```\n\n"
        '<!-- docs-run: fresh -->\n```bash\necho "$GREETING" > greeting.txt; ls ../deploy/config\n```\n',
    )
    space = Workspace(tmp_path / "w").prepare()
    outcomes = run_doc(list(collect(doc)), space, timeout_s=60)
    assert all(o.ok for o in outcomes), [o.report() for o in outcomes]
    assert (space.path / "out" / "greeting.txt").read_text() == "hello\n"
    assert not (ROOT / "out").exists()


def test_a_block_without_an_annotation_is_refused(tmp_path: Path) -> None:
    (block,) = collect(_doc(tmp_path, "```bash\nls\n```\n"))
    with pytest.raises(AnnotationError, match="no '<!-- docs-run"):
        block.need()
    with pytest.raises(AnnotationError, match="says why"):
        parse_annotation("external", "x.md:1")
    need = parse_annotation("stack xfail: Rollout as documented (#38)", "x.md:1")
    assert (need.kind, need.xfail) == ("stack", "Rollout as documented (#38)")
    need = parse_annotation("compose: the container tier xfail: Compose as users run it (#39)", "x.md:1")
    assert (need.kind, need.reason, need.xfail) == ("compose", "the container tier", "Compose as users run it (#39)")
