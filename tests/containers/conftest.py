"""The container tier: the images deploy/Dockerfile builds, run as docker-compose.yml + docker-compose.cpu.yml.

Run by ``make compose-test`` (which builds the images first). Without podman, podman-compose or the images
every test here skips and says which is missing; with ``EMBEDSTREAM_REQUIRE_CONTAINERS=1`` (set by
``make compose-test``) it fails instead. Like the fault suite, each test records produced / embedded /
dead-lettered / duplicates / missing / recovery, printed as a table at the end of the run and written to
``$EMBEDSTREAM_CONTAINER_REPORT`` (JSON) when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .compose import ComposeStack, has_podman_compose, missing_images, podman

REPORT: list[dict] = []
COLUMNS = ["test", "modality", "produced", "embedded", "dead_lettered", "duplicates", "missing", "recovery_s"]


def unavailable() -> str | None:
    """Why the container tier cannot run here, or None."""
    if podman() is None:
        return "podman is not installed (make compose-test installs it: apt-get install podman runc)"
    if not has_podman_compose():
        return "podman-compose is not installed in this environment (make compose-test installs it)"
    missing = missing_images()
    if missing:
        return f"images not built: {', '.join(missing)} (make images)"
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("EMBEDSTREAM_REQUIRE_CONTAINERS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def compose_stack() -> Iterator[ComposeStack]:
    reason = unavailable()
    if reason:
        skip_or_fail(reason)
    stack = ComposeStack(f"estest{os.getpid()}")
    try:
        # Seconds from the first `up` until each service was ready (or each one-shot job done).
        REPORT.append({"test": "compose stack up", **stack.up()})
        yield stack
    finally:
        stack.down()


@pytest.fixture
def report(request):
    def record(**figures) -> None:
        row = {"test": request.node.name, **figures}
        REPORT.append(row)
        print("container report:", row)

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not REPORT:
        return
    terminalreporter.section("container tier")
    terminalreporter.write_line(" | ".join(COLUMNS))
    for row in REPORT:
        terminalreporter.write_line(" | ".join(str(row.get(c, "")) for c in COLUMNS))
    extra = [row for row in REPORT if set(row) - set(COLUMNS)]
    for row in extra:
        terminalreporter.write_line(f"{row['test']}: " + ", ".join(f"{k}={row[k]}" for k in row if k not in COLUMNS))
    out = os.environ.get("EMBEDSTREAM_CONTAINER_REPORT")
    if out:
        Path(out).write_text(json.dumps(REPORT, indent=2))
