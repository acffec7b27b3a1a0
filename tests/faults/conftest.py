"""The fault suite: its own real broker + Triton (these tests kill and freeze them), and a report.

Every test streams messages with unique keys and records produced / embedded / dead-lettered /
duplicates / missing and recovery time; the table prints at the end of the run and is written to
``$EMBEDSTREAM_FAULT_REPORT`` (JSON) when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedstream.config import Settings, load_settings
from embedstream.local.stack.broker import LocalBroker
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.storage import LocalStorage

from ..integration.helpers import private_topics

REPORT: list[dict] = []


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory) -> Iterator[LocalStack]:
    settings = load_settings(
        encoder={"arch": "mobilenetv3_small_100", "weights": "random"},
        # Fail fast and probe often, so outages show up and heal within a test's time.
        triton={"request_timeout_s": 3.0, "max_retries": 1, "retry_backoff_s": 0.2},
        commit_interval_ms=500,
        limits={"max_message_bytes": 2 * 1024 * 1024},
    )
    with LocalStack(settings, workdir=tmp_path_factory.mktemp("faults")) as stack:
        yield stack


@pytest.fixture
def fault_lane(fault_stack, tmp_path, request) -> tuple[Settings, Path]:
    return private_topics(fault_stack.settings, request.node.name, partitions=6), tmp_path


class DurableBroker:
    """The fault stack's Triton with a broker of its own that stores in a local S3 server (on disk)."""

    def __init__(self, fault_stack: LocalStack, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = LocalStorage(workdir)
        self.broker = LocalBroker(workdir, storage=self.storage.location)
        self.triton = fault_stack.triton
        data = fault_stack.settings.model_dump()
        data["kafka"]["bootstrap_servers"] = self.broker.bootstrap
        self.settings = Settings(**data)

    def start(self) -> DurableBroker:
        self.storage.start()
        self.broker.start()
        return self

    def stop(self) -> None:
        self.broker.stop()
        self.storage.stop()


@pytest.fixture(scope="session")
def durable(fault_stack, tmp_path_factory) -> Iterator[DurableBroker]:
    stack = DurableBroker(fault_stack, tmp_path_factory.mktemp("durable")).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def durable_lane(durable, tmp_path, request) -> tuple[Settings, Path]:
    return private_topics(durable.settings, request.node.name, partitions=6), tmp_path


@pytest.fixture
def report(request):
    def record(**figures) -> None:
        row = {"test": request.node.name, **figures}
        REPORT.append(row)
        print("fault report:", row)

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not REPORT:
        return
    cols = ["test", "produced", "embedded", "dead_lettered", "duplicates", "missing", "recovery_s"]
    terminalreporter.section("fault suite")
    terminalreporter.write_line(" | ".join(cols))
    for row in REPORT:
        terminalreporter.write_line(" | ".join(str(row.get(c, "")) for c in cols))
    out = os.environ.get("EMBEDSTREAM_FAULT_REPORT")
    if out:
        Path(out).write_text(json.dumps(REPORT, indent=2))
