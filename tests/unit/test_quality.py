"""Nearest-neighbour retrieval of known groups: chance for noise, near 1 for separated clusters."""

from __future__ import annotations

import numpy as np
import pytest

from embedstream.local.quality import grouped_rows, keyed_retrieval, retrieval


def clusters(groups: int, per_group: int, dim: int, spread: float, seed: int = 0) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    labels = [g for g in range(groups) for _ in range(per_group)]
    return labels, centres[labels] + spread * rng.normal(size=(len(labels), dim))


def test_planted_clusters_are_retrieved():
    labels, x = clusters(25, 10, 64, spread=0.2)
    r = retrieval(labels, x)
    assert r.anchors == 250
    assert r.top1 == 1.0 and r.top5 == 1.0


def test_random_embeddings_score_near_chance():
    labels, _ = clusters(25, 10, 64, spread=0.0)
    x = np.random.default_rng(1).normal(size=(250, 64))
    r = retrieval(labels, x)
    # 9 of the 249 others share a group: top-1 chance ~0.036, top-5 ~0.17
    assert r.chance_top1 == pytest.approx(9 / 249)
    assert abs(r.top1 - r.chance_top1) < 0.05
    assert abs(r.top5 - r.chance_top5) < 0.08


def test_overlapping_clusters_score_in_between():
    labels, x = clusters(25, 10, 64, spread=2.0, seed=2)
    r = retrieval(labels, x)
    assert 0.3 < r.top1 < 0.9
    assert r.top1 < r.top5 < 1.0


def test_cosine_ignores_scale():
    labels, x = clusters(10, 4, 16, spread=0.1)
    scaled = x * np.random.default_rng(3).uniform(0.01, 100, size=(len(x), 1))
    assert retrieval(labels, scaled) == retrieval(labels, x)


def test_a_row_is_never_its_own_neighbour():
    # every group has a single row: nothing can be retrieved, so nothing counts
    r = retrieval(list(range(8)), np.eye(8))
    assert r.anchors == 0


def test_singletons_are_distractors_but_not_anchors():
    # two pairs, each pair pointing the same way, and one singleton identical to the first pair
    x = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0], [1.0, 0.0]])
    r = retrieval(["a", "a", "b", "b", "solo"], x)
    assert r.anchors == 4
    # row 0's nearest other row is the singleton it equals: a miss
    assert r.top1 == 0.75


def test_zero_rows_do_not_crash():
    r = retrieval(["a", "a", "b"], np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert r.anchors == 2 and 0.0 <= r.top1 <= 1.0


def test_keys_pick_the_rows_once_and_skip_ungrouped_ones():
    keys = [b"a1", b"a2", b"a1", b"bad", None, b"b1"]
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels, rows = grouped_rows(keys, x, {b"a1": "a", b"a2": "a", b"b1": "b"})
    assert labels == ["a", "a", "b"]
    assert rows.tolist() == [x[0].tolist(), x[1].tolist(), x[5].tolist()]


def test_a_redelivered_row_does_not_retrieve_itself():
    # without de-duplication the copy of row 0 would be its perfect neighbour
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.9, 0.1]])
    r = keyed_retrieval([b"x", b"y", b"x", b"z"], x, {b"x": "g", b"y": "g", b"z": "h"})
    assert r.anchors == 2 and r.top1 == 0.0


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        retrieval(["a", "a"], np.zeros((3, 2)))
