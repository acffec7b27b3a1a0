"""The docs' ``compose`` blocks run as written, by the docs runner (tests/docsrun), in the container tier.

What a user types in docs/deployment.md (``make images``, then the compose ``up -d``), in a fresh
working directory that looks like the clone's root; the stack it started is taken down afterwards.
A block marked ``xfail`` still runs, and its failure is reported as expected.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.docsrun.blocks import ROOT, command_blocks
from tests.docsrun.runner import Workspace, run_doc

from .conftest import skip_or_fail, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

COMPOSE = [b for b in command_blocks() if b.kind() == "compose"]
DOCS = sorted({b.doc for b in COMPOSE})


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_compose_blocks_run_as_written(doc: Path, tmp_path: Path) -> None:
    if reason := unavailable():
        skip_or_fail(reason)
    space = Workspace(tmp_path / "work").prepare()
    try:
        outcomes = run_doc([b for b in COMPOSE if b.doc == doc], space, timeout_s=1800)
    finally:
        subprocess.run(
            "CONTAINERS_CONF=deploy/containers/containers.conf podman-compose -f docker-compose.yml "
            "-f docker-compose.cpu.yml --profile cpu down -v",
            shell=True,
            cwd=space.path,
            env=space.env(),
            capture_output=True,
            timeout=300,
        )
    for o in outcomes:
        print(f"{o.block.where:<32} {o.seconds:7.1f} s  exit {o.rc}")
    failed = [o for o in outcomes if not o.ok and not o.block.need().xfail]
    assert not failed, "\n\n".join(o.report() for o in failed)
    unexpected = [o.block.where for o in outcomes if o.ok and o.block.need().xfail]
    assert not unexpected, f"marked xfail but ran as written; remove the mark: {unexpected}"
    if expected := [o for o in outcomes if not o.ok]:
        pytest.xfail("; ".join(f"{o.block.where}: {o.block.need().xfail}" for o in expected))
