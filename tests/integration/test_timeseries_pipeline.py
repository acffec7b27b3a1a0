"""Time series end to end on the real local broker and Triton: a trained autoencoder flags anomalies.

Whole-window messages (with injected anomalies and some bad ones) and observation streams share one
input topic; the worker runs as a separate process, as deployed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaProducer

from embedstream.config import KafkaSettings, load_settings
from embedstream.encoders import get_family
from embedstream.kafka_io import ensure_topics
from embedstream.local.stack.broker import LocalBroker
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.training import synthetic

from .helpers import read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T, STRIDE = 32, 16
OBS_SERIES = {"obs-a": 0, "obs-b": 1}  # series -> partition (keyed producers would hash; pinned for the test)


def train_from_a_topic(root) -> Path:
    """`embedstream train --topic`: the normal data as observation messages on a broker, read back from a range.

    The range leaves out a tail of other traffic (not normal, and not JSON), which must not reach the fit.
    """
    from embedstream.cli import main

    normal = synthetic.normal_table(16, 600, seed=0)
    rows = normal.to_pylist()
    channels = [c for c in normal.column_names if c.startswith("ch")]
    broker = LocalBroker(root / "train-broker").start()
    try:
        ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap), {"normal-in": 1})
        docs = [
            {"series_id": r["series_id"], "timestamp_ms": r["timestamp_ms"], "values": [r[c] for c in channels]}
            for r in rows
        ]
        send(broker.bootstrap, "normal-in", [(d["series_id"].encode(), json.dumps(d).encode(), 0) for d in docs])
        send(broker.bootstrap, "normal-in", [(b"x", b"not a reference message", 0)] * 5)
        code = main(
            ["train", "--topic", "normal-in", "--bootstrap", broker.bootstrap, "--start-offset", "0",
             "--end-offset", str(len(docs)), "--family", "autoencoder", "--window", str(T),
             "--out", str(root / "weights"), "--no-progress"]
        )  # fmt: skip
    finally:
        broker.stop()
    assert code == 0
    return root / "weights" / "autoencoder.safetensors"


@pytest.fixture(scope="module")
def ts_stack(tmp_path_factory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("timeseries")
    weights = {"autoencoder": train_from_a_topic(root)}
    settings = load_settings(
        encoder={"family": "autoencoder", "weights": str(weights["autoencoder"]), "max_batch_size": 32},
        kafka={"input_topic": "ts-in", "output_topic": "ts-out", "dead_letter_topic": "ts-dlq", "group_id": "ts-g"},
        batch={"max_size": 16, "max_wait_ms": 20},
        timeseries={"stride": STRIDE},
    )
    with LocalStack(settings, workdir=root / "stack", partitions=2) as running:
        yield running


def send(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes, int | None]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    for key, value, partition in messages:
        producer.send(topic, key=key, value=value, partition=partition)
    producer.flush()
    producer.close()


def observation(series: str, i: int, values: list[float]) -> tuple[bytes, bytes, int]:
    doc = {"series_id": series, "timestamp_ms": synthetic.START_MS + i * synthetic.STEP_MS, "values": values}
    return series.encode(), json.dumps(doc).encode(), OBS_SERIES[series]  # json writes NaN as the NaN token


def test_windows_are_flagged_observations_windowed_and_everything_accounted_for(ts_stack):
    settings = ts_stack.settings
    sig = synthetic.labelled_signal(120, T, seed=21)
    messages: list[tuple[bytes, bytes, int | None]] = []
    labels: dict[bytes, bool] = {}
    for i, w in enumerate(sig.windows()):
        key = f"win-{i:04d}".encode()
        labels[key] = bool(sig.labels[i])
        start = synthetic.START_MS + i * T * synthetic.STEP_MS
        doc = {"series_id": "sig", "values": w.tolist(), "start_ms": start, "end_ms": start + (T - 1) * 1000}
        messages.append((key, json.dumps(doc).encode(), None))
    good = sig.windows()[0]
    bad_windows = {
        b"bad-nan-0": np.where(np.arange(T)[:, None] == 3, np.nan, good),
        b"bad-nan-1": np.where(np.arange(T)[:, None] == 30, np.inf, good),
        b"bad-nan-2": np.where(np.arange(T)[:, None] == 0, np.nan, good),
        b"bad-channels-0": good[:, :2],
        b"bad-channels-1": good[:, :1],
        b"bad-channels-2": np.concatenate([good, good[:, :1]], axis=1),
        b"bad-length": good[:-1],
    }
    for n, (key, arr) in enumerate(bad_windows.items()):
        doc = {"series_id": "sig", "values": arr.tolist()}
        messages.insert(10 + 15 * n, (key, json.dumps(doc).encode(), None))
    # Observation streams: 80 good points each, plus (on obs-a) a NaN, a 4-channel point and a late one.
    rng = np.random.default_rng(5)
    obs_msgs: list[tuple[bytes, bytes, int]] = []
    streams = {s: synthetic.normal_signal(96, rng) for s in OBS_SERIES}
    for i in range(80):
        for s in OBS_SERIES:
            obs_msgs.append(observation(s, i, streams[s][i].tolist()))
        if i == 5:
            obs_msgs.append(observation("obs-a", 1000, [1.0, float("nan"), 2.0]))
            obs_msgs.append(observation("obs-a", 1001, [1.0, 2.0, 3.0, 4.0]))
        if i == 9:
            obs_msgs.append(observation("obs-a", 3, [0.0, 0.0, 0.0]))  # older than point 9: late
    send(ts_stack.broker.bootstrap, settings.kafka.input_topic, messages + obs_msgs)

    rows_expected = 120 + 2 * ((80 - T) // STRIDE + 1)
    dlq_expected = len(bad_windows) + 3
    worker = WorkerProcess(settings, ts_stack.workdir / "w1", "worker-ts-1").start()
    try:
        result = read_all(settings, rows_expected + dlq_expected, timeout_s=240)
    finally:
        worker.terminate()  # graceful: drains and commits what is finished; open windows stay uncommitted

    table = result.table()
    rows = table.to_pylist()
    win_rows = [r for r in rows if r["key"].startswith(b"win-")]
    obs_rows = [r for r in rows if r["key"].startswith(b"obs-")]
    dead = Counter((d.key, d.reason) for d in result.dead_letters)
    print("dead letters:", sorted(dead))

    # Window messages: in = rows + dead letters, each exactly once.
    win_keys = Counter(r["key"] for r in win_rows)
    assert set(win_keys) == set(labels) and max(win_keys.values()) == 1
    bad_reasons = {k: r for (k, r) in dead if k.startswith(b"bad-")}
    assert bad_reasons == {
        **{k: "non_finite" for k in bad_windows if b"nan" in k},
        **{k: "wrong_shape" for k in bad_windows if b"nan" not in k},
    }
    assert len(win_rows) + len(bad_reasons) == len(messages)

    # Observations: rows finish points, dead letters finish bad ones, the rest waits in open windows.
    obs_dead = [d for d in result.dead_letters if d.key.startswith(b"obs-")]
    assert Counter(d.reason for d in obs_dead) == {"non_finite": 1, "wrong_shape": 1, "late": 1}
    finished = sum(r["messages_finished"] for r in obs_rows)
    open_points = 2 * (T - STRIDE)
    assert finished + len(obs_dead) + open_points == len(obs_msgs)
    assert sorted((r["series_id"], r["window_start"].timestamp()) for r in obs_rows) == sorted(
        (s, (synthetic.START_MS + k * STRIDE * synthetic.STEP_MS) / 1000) for s in OBS_SERIES for k in range(4)
    )

    # The served flag finds the injected anomalies.
    flags = np.array([r["anomaly"] for r in win_rows])
    truth = np.array([labels[r["key"]] for r in win_rows])
    precision, recall = synthetic.precision_recall(flags, truth)
    print(f"served autoencoder: precision {precision:.3f} recall {recall:.3f} on {len(win_rows)} windows")
    assert recall >= 0.9 and precision >= 0.8

    # And it is the trained model: errors agree with the bare module in-process.
    model = get_family("autoencoder").build(settings.encoder)
    by_key = {f"win-{i:04d}".encode(): w for i, w in enumerate(sig.windows())}
    with torch.inference_mode():
        _, err, _ = model(torch.from_numpy(np.stack([by_key[r["key"]] for r in win_rows])))
    np.testing.assert_allclose([r["reconstruction_error"] for r in win_rows], err.squeeze(1).numpy(), rtol=1e-4)

    # Restart: the open windows were not committed, so a new worker re-reads their points and the
    # next window of each series starts exactly where it would have without the restart.
    more = [observation(s, i, streams[s][i].tolist()) for i in range(80, 96) for s in OBS_SERIES]
    send(ts_stack.broker.bootstrap, settings.kafka.input_topic, more)
    worker = WorkerProcess(settings, ts_stack.workdir / "w2", "worker-ts-2").start()
    try:
        again = read_all(settings, rows_expected + dlq_expected + 2, timeout_s=240)
    finally:
        worker.terminate()
    obs_after = [
        (r["series_id"], r["window_start"].timestamp(), r["messages_finished"])
        for r in again.table().to_pylist()
        if r["key"].startswith(b"obs-")
    ]
    assert len(obs_after) == len(set(obs_after)) == len(obs_rows) + 2, "no window published twice"
    before = {(r["series_id"], r["window_start"].timestamp(), r["messages_finished"]) for r in obs_rows}
    assert sorted(set(obs_after) - before) == [
        (s, (synthetic.START_MS + 64 * synthetic.STEP_MS) / 1000, STRIDE) for s in sorted(OBS_SERIES)
    ]
    assert len(again.dead_letters) == dlq_expected, "nothing dead-lettered twice"
