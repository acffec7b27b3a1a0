"""Test tiers: tests/unit (no processes), tests/integration (a real local broker and Triton), tests/faults.

`make test` runs two lanes on the two cores (pytest-xdist, ``-n 2 --dist loadgroup``): the unit
tier, which is CPU-bound, beside the tiers on the real stack, which mostly wait (group joins,
restarts, timeouts). Each lane runs its tests in order, one at a time.

Every stack a test starts (in-process, or ``embedstream up``/``demo`` as subprocesses, which inherit
the environment) exports through one session-wide export cache (``export/cache.py``), so an encoder
several stacks serve is exported and checked once per run, not once per stack.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from embedstream.export.cache import ENV as EXPORT_CACHE

_made_cache: str | None = None


def pytest_configure(config):
    global _made_cache
    if not os.environ.get(EXPORT_CACHE):  # one a developer set (to keep across runs) is used as it is
        _made_cache = tempfile.mkdtemp(prefix="embedstream-export-cache-")
        os.environ[EXPORT_CACHE] = _made_cache


def pytest_unconfigure(config):
    if _made_cache is not None:
        os.environ.pop(EXPORT_CACHE, None)
        shutil.rmtree(_made_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.path)).parent.name
        item.add_marker(pytest.mark.xdist_group("unit" if tier == "unit" else "stack"))


_FAULT_ROWS: list[dict] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _FAULT_ROWS.extend(json.loads(getattr(node, "workeroutput", {}).get("fault_report", "[]")))


def pytest_terminal_summary(terminalreporter):
    """The fault suite's table (tests/faults/conftest.py records the rows, in this process or a worker)."""
    faults = sys.modules.get("tests.faults.conftest")
    rows = _FAULT_ROWS + (list(faults.REPORT) if faults is not None else [])
    if not rows:
        return
    cols = ["test", "produced", "embedded", "dead_lettered", "duplicates", "missing", "recovery_s"]
    terminalreporter.section("fault suite")
    terminalreporter.write_line(" | ".join(cols))
    for row in rows:
        terminalreporter.write_line(" | ".join(str(row.get(c, "")) for c in cols))
    out = os.environ.get("EMBEDSTREAM_FAULT_REPORT")
    if out:
        Path(out).write_text(json.dumps(rows, indent=2))
