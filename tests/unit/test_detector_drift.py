"""Drift of traffic from the detector's reference: the sliding window, its gauges, the alert rules that read them."""

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client import REGISTRY

from embedstream import anomaly as detector
from embedstream.config import load_settings
from embedstream.drift import DriftMonitor
from embedstream.encoders import TensorSpec
from embedstream.modalities.image import ImageModality
from embedstream.testing import FakeConsumer, FakeProducer
from embedstream.worker import Worker

from .test_compose import _known_metrics, _promql_metric_names
from .test_detector import DetectorBackend
from .test_worker_loop import SPEC, png, run_until_drained

ROOT = Path(__file__).resolve().parents[2]
DIM = 16


def normal_rows(n, seed):
    """Rows of one fixed distribution: a low-rank cloud around a centre, plus noise."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(3, DIM))
    centre = np.random.default_rng(98).normal(size=DIM) * 3
    return (centre + rng.normal(size=(n, 3)) @ basis + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)


def spec_and_fit(tmp_path, seed=0):
    fitted = detector.fit("mahalanobis", normal_rows(2000, seed), components=3, quantile=0.99)
    base = dataclasses.replace(SPEC, outputs=(TensorSpec("embedding__0", "FP32", (DIM,)),), embedding_dim=DIM)
    return detector.with_detector_spec(base, fitted), fitted, detector.save(fitted, tmp_path / "d")


def outputs_of(fitted, rows):
    s = fitted.score(rows).astype(np.float32)[:, None]
    return {"embedding__0": rows, "anomaly_score__1": s, "anomaly__2": s > fitted.side.threshold}


def gauge(name, model):
    return REGISTRY.get_sample_value(name, {"model": model})


def test_normal_traffic_shows_the_expected_shift_and_moved_traffic_more(tmp_path):
    spec, fitted, path = spec_and_fit(tmp_path)
    settings = load_settings(encoder={"detector": str(path)})
    monitor = DriftMonitor.for_worker(spec, settings)
    assert monitor is not None and monitor.window_rows == 1000
    for i in range(40):  # 40 batches of 50: the window keeps the latest 1000 rows
        monitor.observe(outputs_of(fitted, normal_rows(50, seed=100 + i)))
    assert gauge("embedstream_drift_window_rows", spec.name) == 1000
    shift, expected = (
        gauge("embedstream_drift_mean_shift", spec.name),
        gauge("embedstream_drift_mean_shift_expected", spec.name),
    )
    assert expected == pytest.approx(np.sqrt(fitted.side.score_mean / 1000))
    assert 0.3 * expected < shift < 2.5 * expected, (shift, expected)
    assert gauge("embedstream_drift_anomaly_rate", spec.name) < 0.05
    assert gauge("embedstream_drift_anomaly_rate_expected", spec.name) == pytest.approx(0.01)

    # The whole stream moves: its mean shift is many times what a window of normal rows shows.
    moved = normal_rows(1000, seed=7) + 0.6 * np.random.default_rng(3).normal(size=DIM).astype(np.float32)
    for chunk in np.split(moved, 20):
        monitor.observe(outputs_of(fitted, chunk))
    assert gauge("embedstream_drift_mean_shift", spec.name) > 3 * expected
    assert monitor.anomaly_rate == gauge("embedstream_drift_anomaly_rate", spec.name)


def test_the_rate_is_kept_without_the_detector_file_and_nothing_without_a_detector(tmp_path, caplog):
    spec, fitted, _ = spec_and_fit(tmp_path)
    other = detector.save(detector.fit("mahalanobis", normal_rows(500, 5), components=3), tmp_path / "other")
    with caplog.at_level(logging.WARNING, logger="embedstream.drift"):
        monitor = DriftMonitor.for_worker(spec, load_settings(encoder={"detector": str(other)}))
    assert monitor is not None and "is not the served detector" in caplog.text
    rows = np.concatenate([normal_rows(30, 1), 50 * np.ones((10, DIM), np.float32)])
    monitor.observe(outputs_of(fitted, rows))
    assert monitor.mean_shift is None and monitor.anomaly_rate == pytest.approx(10 / 40)
    assert DriftMonitor.for_worker(spec, load_settings()).mean_shift is None  # type: ignore[union-attr]
    assert DriftMonitor.for_worker(SPEC, load_settings()) is None
    with caplog.at_level(logging.WARNING, logger="embedstream.drift"):
        assert DriftMonitor.for_worker(SPEC, load_settings(encoder={"detector": str(other)})) is None
    assert "has no detector" in caplog.text


def test_the_worker_feeds_the_monitor_from_the_served_outputs():
    grey = [np.full(6, v, np.float32) + np.random.default_rng(v).normal(0, 0.01, 6) for v in range(60, 200)]
    fitted = detector.fit("knn", np.stack(grey), k=3)
    spec = detector.with_detector_spec(dataclasses.replace(SPEC, name="image-drift"), fitted)
    settings = load_settings(batch={"max_size": 4, "max_wait_ms": 0}, commit_interval_ms=0, worker_id="w")
    red = io.BytesIO()
    Image.new("RGB", (20, 16), (250, 10, 10)).save(red, format="PNG")
    consumer = FakeConsumer({0: [(b"a", png(100)), (b"b", png(130)), (b"c", red.getvalue())]})
    worker = Worker(settings, ImageModality(spec, settings), DetectorBackend(spec, fitted), consumer, FakeProducer())
    run_until_drained(worker, consumer)
    assert gauge("embedstream_drift_window_rows", "image-drift") == 3
    assert gauge("embedstream_drift_anomaly_rate", "image-drift") == pytest.approx(1 / 3)  # the red one


@pytest.fixture(scope="module")
def alert_rules():
    return yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())


def test_alert_rules_parse_and_read_only_metrics_the_workers_export(alert_rules):
    rules = [r for group in alert_rules["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} == {"EmbeddingAnomalyRateHigh", "EmbeddingMeanDrift"}
    known = _known_metrics()
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])
        names = _promql_metric_names(rule["expr"])
        assert names and names <= known, (rule["alert"], names - known)
        assert names <= {n for n in known if n.startswith("embedstream_drift_")}
        assert rule["expr"].count("(") == rule["expr"].count(")")
        assert rule["for"].endswith("m") and int(rule["for"][:-1]) >= 5


def test_prometheus_loads_the_rules_compose_mounts(alert_rules):
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mount = "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"
    assert mount in compose["services"]["prometheus"]["volumes"]
