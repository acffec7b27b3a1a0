"""A worker's collector settings: start-up frozen out of the walks, collections far less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from embedstream import collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_collector_freezes_start_up_and_raises_the_thresholds(restored_collector: None) -> None:
    survivor = [object() for _ in range(10)]  # something start-up made and keeps
    collector.tune_collector()
    assert gc.get_freeze_count() >= len(survivor)
    assert gc.get_threshold() == (collector.GEN0_THRESHOLD, collector.GEN1_THRESHOLD, collector.GEN2_THRESHOLD)
    # Cyclic garbage made afterwards is still collected, on the raised schedule or on demand.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
