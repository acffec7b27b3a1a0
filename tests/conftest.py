"""Test tiers: tests/unit (no processes), tests/integration (a real local broker and Triton).

Every stack a test starts (in-process, or ``embedstream up``/``demo`` as subprocesses, which inherit
the environment) exports through one session-wide export cache (``export/cache.py``), so an encoder
several stacks serve is exported and checked once per run, not once per stack.
"""

from __future__ import annotations

import os
import shutil
import tempfile

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
