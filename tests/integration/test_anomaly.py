"""The embedding-space anomaly detector served by Triton inside EfficientNet-Lite0, measured on real images.

The detector is fitted in-process (``embedstream train detector``'s code) on augmented copies of the
photo stream's photos; Triton then serves the encoder with it, a worker process embeds photos from
other packages (never seen by the fit) and out-of-distribution images (scikit-image's textures,
drawings, test charts, microscopy and retina images, generated flat, noise and stripe images), and
what is measured is the ``anomaly_score``/``anomaly`` columns read back from the output topic.
docs/anomaly.md has the figures and the study behind the choice of detector.
A second worker gets a stream of normal photos, then OOD images, while its /metrics are scraped: the drift
gauges and the alert rules of deploy/prometheus/alerts.yml, evaluated on the scrapes (docs/anomaly.md, Drift).

The stack is this module's own (Lite0 with a detector); it starts in ~30 s on 2 cores.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from embedstream import anomaly as detector
from embedstream.cli import main as cli_main
from embedstream.config import load_settings
from embedstream.local.detector_study import image_split
from embedstream.local.samples.ood import NEAR_OOD
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.sinks.arrow_codec import embeddings_matrix
from embedstream.training.detector import (
    InProcessEncoder,
    Reference,
    fit_and_save,
    precision_recall,
    reference_from_topic,
    roc_auc,
)

from .helpers import private_topics, produce, read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARCH = "tf_efficientnet_lite0"
MIN_AUC = 0.9


@pytest.fixture(scope="module")
def split():
    return image_split(seed=0)


@pytest.fixture(scope="module")
def fitted(split, tmp_path_factory) -> tuple[Path, InProcessEncoder]:
    settings = load_settings(encoder={"arch": ARCH})
    encoder = InProcessEncoder(settings)
    emb = encoder.embed(split.fit)
    fitted_path, _ = fit_and_save(
        Reference(emb, {"study": "image"}),
        encoder.describe(),
        tmp_path_factory.mktemp("detector") / "lite0.safetensors",
        kind="mahalanobis",
        components=8,
        groups=split.fit_groups,
    )
    return fitted_path, encoder


@pytest.fixture(scope="module")
def anomaly_stack(fitted, tmp_path_factory) -> Iterator[LocalStack]:
    settings = load_settings(encoder={"arch": ARCH, "detector": str(fitted[0])})
    with LocalStack(settings, workdir=tmp_path_factory.mktemp("anomaly-stack"), partitions=2) as stack:
        yield stack


def test_served_anomaly_columns_tell_unseen_photos_from_out_of_distribution_images(
    anomaly_stack, split, fitted, tmp_path
):
    lane = private_topics(anomaly_stack.settings, "anomaly", partitions=2)
    messages = [(f"normal-{i:03d}".encode(), v) for i, v in enumerate(split.normal)]
    messages += [(f"ood-{name}".encode(), v) for name, v in zip(split.ood_names, split.ood, strict=True)]
    produce(lane.kafka.bootstrap_servers, lane.kafka.input_topic, messages)
    worker = WorkerProcess(lane, tmp_path, "worker").start()
    try:
        result = read_all(lane, len(messages), timeout_s=240)
    finally:
        worker.terminate()
    assert not result.dead_letters, [(d.key, d.reason) for d in result.dead_letters]
    table = result.table()
    assert table.num_rows == len(messages)
    keys = [k.decode() for k in table.column("key").to_pylist()]
    scores = np.asarray(table.column("anomaly_score").to_pylist(), np.float64)
    flags = np.asarray(table.column("anomaly").to_pylist(), bool)
    det = detector.load(fitted[0])
    # Exact: the served flag is the served score against the FP32 threshold stored in the model.
    np.testing.assert_array_equal(flags, scores > np.float32(det.side.threshold))
    # Triton's score is the one the fit computes on the rows' own embeddings.
    np.testing.assert_allclose(scores, det.score(embeddings_matrix(table)), rtol=1e-3, atol=1e-4)

    normal = np.array([k.startswith("normal-") for k in keys])
    near = np.array([k.startswith("ood-") and k[4:].rsplit("-", 1)[0] in NEAR_OOD for k in keys])
    far = ~normal & ~near
    auc_all, auc_far = roc_auc(scores[normal], scores[~normal]), roc_auc(scores[normal], scores[far])
    precision, recall = precision_recall(flags[normal], flags[~normal])
    print(
        f"\nserved detector: ROC-AUC {auc_all:.3f} (all OOD), {auc_far:.3f} (far OOD), "
        f"{roc_auc(scores[normal], scores[near]):.3f} (microscopy/retina); at the threshold precision "
        f"{precision:.3f}, recall {recall:.3f}, normal flagged {flags[normal].mean():.3f}"
    )
    assert auc_far >= MIN_AUC, f"unseen photos vs textures/drawings/synthetic: ROC-AUC {auc_far:.3f} < {MIN_AUC}"
    assert precision >= 0.9 and flags[normal].mean() <= 0.1, (precision, flags[normal].mean())

    # The same output topic as a normal reference (embedstream train detector --topic): every row, as published.
    reference, encoder = reference_from_topic(lane, lane.kafka.output_topic)
    assert (
        encoder["name"] == f"image-{ARCH}"
        and encoder["weights_sha256"] == table.schema.metadata[b"embedstream.weights_sha256"].decode()
    )
    assert len(reference.embeddings) == len(messages)
    # An offset range: the first message of each partition (the embedded broker may report a partition's
    # end late, and then reading it ends early: one message or two).
    first, _ = reference_from_topic(lane, lane.kafka.output_topic, start_offset=0, end_offset=1)
    assert 0 < len(first.embeddings) < len(messages) and first.source["messages"] in (1, 2)

    # The command, as an operator runs it, on the whole topic.
    out = tmp_path / "from-topic.safetensors"
    args = ["train", "detector", "--topic", lane.kafka.output_topic, "--bootstrap", lane.kafka.bootstrap_servers]
    assert cli_main([*args, "--kind", "knn", "--out", str(out), "--no-progress"]) == 0
    side = detector.load(out).side
    assert side.kind == "knn" and side.reference_rows + side.holdout_rows == len(messages)
    assert side.training["reference"]["topic"] == lane.kafka.output_topic and side.encoder["name"] == f"image-{ARCH}"


# --- Drift gauges on a real stream, and the alert rules of deploy/prometheus/alerts.yml evaluated on them ---

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
DRIFT_NORMAL_ROWS = 240  # over the rules' 200-row minimum window
# The rules' ``for:`` is taken as met by this many consecutive scrapes, each after a new batch, where the
# expression holds (no clock here: a scrape per batch stands for Prometheus' evaluations over the duration).
FOR_SCRAPES = 2
# OOD rows after the switch by which each rule fires (measured: docs/anomaly.md, Drift); a 240-row normal
# window, full batches of 16 rows (the test sets them): the second batch boundary past the crossing.
MAX_OOD_ROWS_TO_ALERT = {"EmbeddingMeanDrift": 170, "EmbeddingAnomalyRateHigh": 170}


def _promql_vector(expr: str, samples: dict[str, dict[tuple, float]]) -> dict[tuple, float]:
    """Evaluates the PromQL subset the rules use: metric names, numbers, ``*``, ``+``, ``-``, one
    comparison (a filter, as PromQL's without ``bool``) and ``and``, one-to-one on identical label sets.
    Anything else raises, so a rule that outgrows this subset fails the test instead of passing unread."""
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*|\d+(?:\.\d+)?|>=|<=|==|!=|[-+*/<>()]", expr)
    if "".join(tokens) != re.sub(r"\s+", "", expr):
        raise ValueError(f"outside the evaluated subset: {expr!r}")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def binary(a, b, op):
        if isinstance(a, float) and isinstance(b, float):
            return op(a, b)
        if isinstance(a, float):
            return {k: op(a, v) for k, v in b.items()}
        if isinstance(b, float):
            return {k: op(v, b) for k, v in a.items()}
        return {k: op(v, b[k]) for k, v in a.items() if k in b}

    def atom():
        tok = take()
        if tok == "(":
            value = additive()
            assert take() == ")"
            return value
        if re.fullmatch(r"\d+(?:\.\d+)?", tok):
            return float(tok)
        if tok in ("and", "or", "unless", "bool", "by", "without", "on", "ignoring") or peek() == "(":
            raise ValueError(f"outside the evaluated subset: {tok!r} in {expr!r}")  # and functions, aggregations
        return dict(samples.get(tok, {}))

    def product():
        value = atom()
        while peek() in ("*", "/"):
            op = take()
            value = binary(value, atom(), (lambda a, b: a * b) if op == "*" else (lambda a, b: a / b))
        return value

    def additive():
        value = product()
        while peek() in ("+", "-"):
            op = take()
            value = binary(value, product(), (lambda a, b: a + b) if op == "+" else (lambda a, b: a - b))
        return value

    comparisons = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}

    def comparison() -> dict[tuple, float]:
        left = additive()
        op = take()
        right = additive()
        if not isinstance(left, dict) or op not in comparisons:
            raise ValueError(f"outside the evaluated subset: {op!r} in {expr!r}")
        keep = binary(left, right, lambda a, b: bool(comparisons[op](a, b)))
        return {k: v for k, v in left.items() if keep.get(k)}

    result = comparison()
    while peek() == "and":
        take()
        other = comparison()
        result = {k: v for k, v in result.items() if k in other}
    if peek() is not None:
        raise ValueError(f"outside the evaluated subset at {peek()!r}: {expr!r}")
    return result


def _scrape(port: int) -> dict[str, dict[tuple, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("embedstream_drift_"):
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_drift_gauges_stay_low_on_normal_photos_and_the_alert_rules_fire_after_the_switch_to_ood(
    anomaly_stack, fitted, tmp_path
):
    from embedstream.local.samples.ood import ood_images, unseen_photos
    from embedstream.local.samples.photos import augment, encode, natural_photos

    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert set(MAX_OOD_ROWS_TO_ALERT) <= set(rules)
    rng = np.random.default_rng(1)
    # Normal traffic: fresh copies (never in the fit) of the reference's photos and of the unseen photos,
    # round robin. Copies of the 5 unseen photos alone are not 240 independent rows: their mean stays
    # where those 5 photos' mean is, and that already lies over 3x the independent-row expectation.
    photos = [p.open() for p in natural_photos()] + unseen_photos()
    normal = [encode(augment(photos[i % len(photos)], rng), "JPEG", 85) for i in range(DRIFT_NORMAL_ROWS)]
    ood, _ = ood_images(rng, copies=10)
    ood = [ood[i] for i in rng.permutation(len(ood))]  # mixed kinds, as broken traffic would come
    lane = private_topics(anomaly_stack.settings, "drift", partitions=1)  # one partition: the switch is one offset
    # Full batches of 16, one at a time: a scrape sees every batch, and where the rules fire does not
    # depend on how busy the machine is (batches that fill while they wait would cover more rows).
    batch = {"max_size": 16, "max_wait_ms": 2_000, "max_in_flight": 1, "dispatch_when_free": False}
    lane = lane.model_copy(update={"batch": lane.batch.model_copy(update=batch)})
    messages = [(f"normal-{i:03d}".encode(), v) for i, v in enumerate(normal)]
    messages += [(f"ood-{i:03d}".encode(), v) for i, v in enumerate(ood)]
    produce(lane.kafka.bootstrap_servers, lane.kafka.input_topic, messages)

    scrapes: list[dict[str, dict[tuple, float]]] = []
    stop = threading.Event()

    def scraper(port: int) -> None:
        while not stop.is_set():
            try:
                scrapes.append(_scrape(port))
            except OSError:
                pass  # not listening yet
            stop.wait(0.02)

    worker = WorkerProcess(lane, tmp_path, "worker").start()
    thread = threading.Thread(target=scraper, args=(worker.health_port,), daemon=True)
    thread.start()
    try:
        result = read_all(lane, len(messages), timeout_s=240)
        time.sleep(0.3)  # a scrape after the last batch
    finally:
        stop.set()
        thread.join()
        worker.terminate()
    assert result.table().num_rows == len(messages) and not result.dead_letters
    assert len(messages) < 1000  # the default window holds the whole stream: window rows = rows seen

    # One state per batch: the scrapes after each new window size.
    states, seen = [], set()
    for s in scrapes:
        rows = next(iter(s.get("embedstream_drift_window_rows", {}).values()), 0.0)
        if rows and rows not in seen:
            seen.add(rows)
            states.append((int(rows), s))
    assert len(states) >= 8, f"{len(states)} distinct scrapes"
    assert states[-1][0] == len(messages)

    def gauge(s, name: str) -> float:
        return next(iter(s[name].values()))

    record = [
        (rows, gauge(s, "embedstream_drift_mean_shift"), gauge(s, "embedstream_drift_mean_shift_expected"),
         gauge(s, "embedstream_drift_anomaly_rate"), gauge(s, "embedstream_drift_anomaly_rate_expected"))
        for rows, s in states
    ]  # fmt: skip
    print("\nrows  mean_shift  expected  ratio  anomaly_rate  expected")
    for rows, shift, expected, rate, rate_expected in record:
        print(f"{rows:4d}  {shift:10.3f}  {expected:8.3f}  {shift / expected:5.2f}  {rate:12.3f}  {rate_expected:8.3f}")

    fired = {}
    for name, rule in rules.items():
        firing = [bool(_promql_vector(rule["expr"], s)) for _, s in states]
        # The threshold comparison alone (the rule's first conjunct), also on windows under the 200-row minimum.
        crossing = [bool(_promql_vector(rule["expr"].split(" and ")[0], s)) for _, s in states]
        normal_part = [i for i, (rows, _) in enumerate(states) if rows <= DRIFT_NORMAL_ROWS]
        assert normal_part and not any(firing[i] for i in normal_part), (name, record)
        if name == "EmbeddingMeanDrift":  # its expectation holds for small windows too; a rate's does not
            assert not any(crossing[i] for i in normal_part), (name, record)
        fired_at = next(
            (states[i][0] - DRIFT_NORMAL_ROWS for i in range(FOR_SCRAPES - 1, len(states))
             if all(firing[i - FOR_SCRAPES + 1 : i + 1])),
            None,
        )  # fmt: skip
        print(f"{name}: fires (for: {FOR_SCRAPES} consecutive batches) {fired_at} OOD rows after the switch")
        fired[name] = fired_at
    assert all(v is not None and v <= MAX_OOD_ROWS_TO_ALERT[k] for k, v in fired.items()), (fired, record)


def test_the_rule_evaluator_reads_the_rules_as_promql_does():
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    a, b = (("model", "image-a"),), (("model", "text-b"),)

    def samples(shift, expected, rows):
        return {
            "embedstream_drift_mean_shift": {a: shift, b: 0.1},
            "embedstream_drift_mean_shift_expected": {a: expected, b: 0.1},
            "embedstream_drift_window_rows": {a: rows, b: 500.0},
        }

    # A filter: the left-hand side's value, per matching series; the other model never passes.
    assert _promql_vector(rules["EmbeddingMeanDrift"], samples(0.31, 0.1, 200)) == {a: 0.31}
    assert _promql_vector(rules["EmbeddingMeanDrift"], samples(0.30, 0.1, 500)) == {}  # not over 3 x
    assert _promql_vector(rules["EmbeddingMeanDrift"], samples(0.9, 0.1, 199)) == {}  # window too small
    assert _promql_vector(rules["EmbeddingMeanDrift"], {}) == {}  # gauges unset: no series
    rate = {"embedstream_drift_anomaly_rate": {a: 0.05}, "embedstream_drift_anomaly_rate_expected": {a: 0.01}}
    assert _promql_vector(rules["EmbeddingAnomalyRateHigh"], {**rate, "embedstream_drift_window_rows": {a: 200}})
    rate["embedstream_drift_anomaly_rate"] = {a: 0.04}
    assert not _promql_vector(rules["EmbeddingAnomalyRateHigh"], {**rate, "embedstream_drift_window_rows": {a: 200}})
    for outside in ("rate(x[5m]) > 1", "x > bool 1", "x > 1 or y > 1", "sum by (model) (x) > 1"):
        with pytest.raises(ValueError):
            _promql_vector(outside, {})
