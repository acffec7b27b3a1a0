"""README.md and docs/*.md run as written: every ``fresh``, ``stack``, ``background`` and ``up`` block,
in order, one fresh working directory and one shell state per doc (``tests/docsrun``).

``stack`` blocks run against one ``embedstream up``: docs/local-stack.md's own `up` block, as written
(the runner only picks a free broker port, ``EMBEDSTREAM_BROKER_PORT=0``); its work directory is each
doc's ``.embedstream``, so ``. .embedstream/stack.env`` finds its addresses. A block marked ``xfail``
still runs: its failure is reported as expected, and its passing fails the test until the mark goes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docsrun.blocks import ROOT, RUN_KINDS, Block, collect, user_docs
from tests.docsrun.runner import READY, WAIT_S, Workspace, run_doc, stop_leftovers

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

BLOCK_TIMEOUT_S = 420.0


def runnable(doc: Path) -> list[Block]:
    return [b for b in collect(doc) if b.runs_code and b.kind() in RUN_KINDS]


DOCS = [doc for doc in user_docs() if runnable(doc)]


# The runner's own settings for every doc: an `up` takes a free broker port, not 9092.
RUNNER_ENV = {"EMBEDSTREAM_BROKER_PORT": "0"}
UP_DOC = ROOT / "docs" / "local-stack.md"


@pytest.fixture(scope="module")
def up_stack(tmp_path_factory) -> Iterator[Workspace]:
    """docs/local-stack.md's `up` block, run as written in that doc's own fresh directory; it stays up for
    every doc's `stack` blocks (their `.embedstream` is its work directory) and is stopped with Ctrl-C at
    the end, where it must exit 0."""
    (block,) = [b for b in runnable(UP_DOC) if b.kind() == "up"]
    space = Workspace(tmp_path_factory.mktemp("docs") / "local-stack", extra_env=RUNNER_ENV).prepare()
    up = space.start(block)
    try:
        if not up.wait_for(READY, WAIT_S):
            pytest.fail(f"{block.where}: embedstream up did not get ready:\n{up.output[-4000:]}")
        yield space
    finally:
        stopped = up.interrupt()
        stop_leftovers(space.run_id)
        assert stopped.ok, f"{block.where}: embedstream up did not stop cleanly on Ctrl-C:\n{stopped.output[-4000:]}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_doc_runs_as_written(doc: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = runnable(doc)
    kinds = {b.kind() for b in blocks}
    if doc == UP_DOC:
        # Its `up` block is the stack every doc uses: running (the fixture), stopped and checked at the end;
        # its other blocks run in its directory, and nothing is reaped after them.
        space = request.getfixturevalue("up_stack")
        outcomes = run_doc([b for b in blocks if b.kind() != "up"], space, timeout_s=BLOCK_TIMEOUT_S, reap=False)
    else:
        stack = request.getfixturevalue("up_stack").path / ".embedstream" if "stack" in kinds else None
        space = Workspace(tmp_path / "work", stack, extra_env=RUNNER_ENV).prepare()
        outcomes = run_doc(blocks, space, timeout_s=BLOCK_TIMEOUT_S)

    for o in outcomes:
        state = "ok" if o.ok else ("expected failure" if o.block.need().xfail else "FAILED")
        print(f"{o.block.where:<32} {o.block.need().kind:<10} {o.seconds:6.1f} s  {state}")
    failed = [o for o in outcomes if not o.ok and not o.block.need().xfail]
    assert not failed, "\n\n".join(o.report() for o in failed)
    unexpected = [o.block.where for o in outcomes if o.ok and o.block.need().xfail]
    assert not unexpected, f"marked xfail but ran as written; remove the mark: {unexpected}"
    expected = [o for o in outcomes if not o.ok]
    if expected:
        pytest.xfail("; ".join(f"{o.block.where}: {o.block.need().xfail}" for o in expected))
