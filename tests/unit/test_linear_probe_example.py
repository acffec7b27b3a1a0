"""examples/linear_probe.py without a broker: the label join, the counts it prints, when it refuses.

The end-to-end run (real broker, worker and Triton, read back through the example as a subprocess)
is tests/integration/test_image_quality.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "linear_probe.py"


@pytest.fixture(scope="module")
def lp() -> ModuleType:
    spec = importlib.util.spec_from_file_location("linear_probe", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["linear_probe"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _rows(lp, vectors: dict[str, np.ndarray], model: str = "image-m", read: int | None = None):
    rows = lp.Rows(vectors=dict(vectors), read=len(vectors) if read is None else read)
    rows.models.add(model)
    return rows


def test_labels_csv_takes_an_optional_header_and_names_a_bad_line(lp, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("key,label\ncam-1/frame-9,cat\n\nb,dog\n")
    assert lp.read_labels(path) == {"cam-1/frame-9": "cat", "b": "dog"}
    path.write_text("a,cat\nb\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: expected 'key,label'"):
        lp.read_labels(path)


def test_separable_classes_score_high_and_noise_scores_near_chance(lp):
    rng = np.random.default_rng(0)
    ids = [f"r{i:03d}" for i in range(120)]
    labels = {i: "a" if n % 2 else "b" for n, i in enumerate(ids)}
    centres = {"a": np.full(16, 1.0, np.float32), "b": np.full(16, -1.0, np.float32)}
    apart = {i: centres[labels[i]] + rng.normal(0, 0.5, 16).astype(np.float32) for i in ids}
    noise = {i: rng.normal(0, 1, 16).astype(np.float32) for i in ids}
    for vectors, low, high in ((apart, 0.95, 1.0), (noise, 0.2, 0.8)):
        rows = _rows(lp, vectors)
        got_ids, y, _ = lp.join(rows, labels)
        line, scores = lp.probe(rows, got_ids, y, 5)
        assert len(scores) == 5 and low <= scores.mean() <= high, scores
        assert line.startswith("accuracy (image-m, logistic regression, 5-fold stratified): ")


def test_counts_name_unlabelled_rows_missing_rows_and_redelivered_ones(lp):
    vectors = {f"k{i}": np.zeros(4, np.float32) for i in range(6)}
    rows = _rows(lp, vectors, read=8)  # two rows came twice (at-least-once delivery)
    rows.other_models["image-other"] = 3
    rows.read += 3
    labels = {"k0": "x", "k1": "y", "gone": "x"}
    ids, y, lines = lp.join(rows, labels)
    assert ids == ["k0", "k1"] and y == ["x", "y"]
    assert lines == [
        "rows read: 11, other models skipped: {'image-other': 3}, duplicate rows dropped: 2",
        "rows labelled: 2, rows without a label: 4, labels without a row: 1",
        "classes: 2 (x 1, y 1)",
    ]


def test_it_refuses_mixed_models_one_class_and_too_few_rows_per_fold(lp):
    vectors = {f"k{i}": np.full(4, i, np.float32) for i in range(10)}
    rows = _rows(lp, vectors)
    labels = {k: "a" if n < 7 else "b" for n, k in enumerate(vectors)}
    ids, y, _ = lp.join(rows, labels)
    with pytest.raises(ValueError, match="smallest has 3"):
        lp.probe(rows, ids, y, 5)
    with pytest.raises(ValueError, match="at least two labels"):
        lp.probe(rows, ids, ["a"] * len(ids), 2)
    rows.models.add("image-other")
    with pytest.raises(ValueError, match="--model-name"):
        lp.probe(rows, ids, y, 2)


def test_folds_must_be_at_least_two(lp, tmp_path, capsys):
    with pytest.raises(SystemExit):
        lp.parse_args(["--labels", str(tmp_path / "l.csv"), "--folds", "1"])
    assert "--folds must be at least 2" in capsys.readouterr().err
