"""README.md and docs/*.md run as written: every ``fresh``, ``stack``, ``background`` and ``up`` block,
in order, one fresh working directory and one shell state per doc (``tests/docsrun``).

``stack`` blocks run against one ``embedstream up`` started here as a user starts it (the runner
only picks a free broker port, ``--broker-port 0``); its work directory is the doc's ``.embedstream``,
so ``. .embedstream/stack.env`` finds its addresses. A block marked ``xfail`` still runs: its failure
is reported as expected, and its passing fails the test until the mark goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docsrun.blocks import ROOT, RUN_KINDS, Block, collect, user_docs
from tests.docsrun.runner import READY, Running, Workspace, run_doc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

BLOCK_TIMEOUT_S = 420.0


def runnable(doc: Path) -> list[Block]:
    return [b for b in collect(doc) if b.runs_code and b.kind() in RUN_KINDS]


DOCS = [doc for doc in user_docs() if runnable(doc)]


@pytest.fixture(scope="module")
def up_stack(tmp_path_factory) -> Iterator[Path]:
    """``embedstream up`` on a free port, started the way docs/local-stack.md starts it."""
    workdir = tmp_path_factory.mktemp("docs-stack") / ".embedstream"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSTREAM_") or k == "EMBEDSTREAM_EXPORT_CACHE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(
        ["embedstream", "up", "--broker-port", "0", "--workdir", str(workdir)],
        cwd=workdir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    up = Running(Block(ROOT / "docs/local-stack.md", 0, "bash", "embedstream up", "up"), proc, 0.0)
    try:
        if not up.wait_for(READY, 300):
            pytest.fail(f"embedstream up did not get ready:\n{up.output[-4000:]}")
        yield workdir
    finally:
        stopped = up.interrupt()
        assert stopped.ok, f"embedstream up did not stop cleanly on Ctrl-C:\n{stopped.output[-4000:]}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_doc_runs_as_written(doc: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = runnable(doc)
    kinds = {b.need().kind for b in blocks}
    stack = request.getfixturevalue("up_stack") if "stack" in kinds and "up" not in kinds else None
    # A doc that starts its own `embedstream up` gets a free broker port; everything else is as written.
    space = Workspace(tmp_path / "work", stack, extra_env={"EMBEDSTREAM_BROKER_PORT": "0"}).prepare()
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
