"""The compose stack end to end, then its containers killed, stopped and restarted mid-stream.

Traffic is produced from outside the containers (real photos, paraphrased sentences, sensor windows, some
bad on purpose) to the topics the workers' config files name. Every message must come back as a row on
the output topic or as a dead letter, and every image and text row must land in both stores (LanceDB and
Feast, each written by its own sink container). Missing must be 0 in every row; duplicates are allowed
(at-least-once) except after a SIGTERM.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest

from embedstream.config import Settings, load_settings
from embedstream.local.readback import TopicReader
from embedstream.local.samples.photos import photo_stream
from embedstream.local.samples.traffic import text_traffic
from embedstream.training import synthetic

from ..integration.helpers import accounting, produce
from .compose import ComposeStack, wait_until

pytestmark = [pytest.mark.slow]

Message = tuple[bytes, bytes]


# -- traffic --------------------------------------------------------------------------------------------


def image_messages(count: int, prefix: str, bad_every: int = 0) -> tuple[list[Message], list[bytes]]:
    stream = list(photo_stream(count, bad_every=bad_every, seed=3, prefix=prefix))
    return [(m.key, m.value) for m in stream], [m.key for m in stream if m.source is None]


def text_messages(count: int, bad_every: int) -> tuple[list[Message], list[bytes]]:
    traffic = text_traffic(load_settings(), count, bad_every)
    return traffic.messages, traffic.bad_keys


def window_messages(count: int) -> tuple[list[Message], list[bytes]]:
    """Windows of 32 points x 3 channels, the shape deploy/data/normal.csv trains; two of them malformed."""
    signal = synthetic.labelled_signal(count, 32, seed=21)
    messages = []
    for i, w in enumerate(signal.windows()):
        start = synthetic.START_MS + i * 32 * synthetic.STEP_MS
        doc = {"series_id": "compose-1", "values": w.tolist(), "start_ms": start, "end_ms": start + 31 * 1000}
        messages.append((f"window-{i:05d}".encode(), json.dumps(doc).encode()))
    bad = {
        b"window-bad-nan": {"series_id": "compose-1", "values": [[float("nan")] * 3] * 32},
        b"window-bad-shape": {"series_id": "compose-1", "values": [[1.0, 2.0]] * 32},
    }
    messages += [(key, json.dumps(doc).encode()) for key, doc in bad.items()]
    return messages, list(bad)


# -- accounting -----------------------------------------------------------------------------------------


class Reading:
    """The output and dead-letter topics of one worker config, read from the start as rows arrive."""

    def __init__(self, settings: Settings) -> None:
        self.reader = TopicReader(settings.kafka)

    def until(self, keys: list[bytes], done: Callable[[dict[str, int]], bool], timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        counts = accounting(keys, self.reader.result, among_others=True)
        while not done(counts) and time.monotonic() < deadline:
            self.reader.poll(0.3)
            counts = accounting(keys, self.reader.result, among_others=True)
        return counts

    def complete(self, keys: list[bytes], timeout_s: float = 300, settle_s: float = 3.0) -> dict[str, int]:
        """Read until every key is accounted for, then a little longer for late duplicates."""
        self.until(keys, lambda c: c["missing"] == 0, timeout_s)
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:
            self.reader.poll(0.3)
        return accounting(keys, self.reader.result, among_others=True)

    def rows_of(self, keys: list[bytes]) -> list[tuple[str, str, str]]:
        """(id, model name, model version) of the output rows of these keys: what each store keys a row by."""
        wanted = set(keys)
        table = self.reader.result.table()
        cols = [table.column(c).to_pylist() for c in ("key", "id", "model_name", "model_version")]
        return sorted({(i, m, v) for k, i, m, v in zip(*cols, strict=True) if k in wanted})

    def close(self) -> None:
        self.reader.close()


def lancedb_ids(stack: ComposeStack) -> set[tuple[str, str, str]]:
    import lancedb

    db = lancedb.connect(str(stack.volume_dir("lancedb")))
    found: set[tuple[str, str, str]] = set()
    for name in db.list_tables().tables:
        table = db.open_table(name).to_arrow()
        cols = [table.column(c).to_pylist() for c in ("id", "model_name", "model_version")]
        found |= set(zip(*cols, strict=True))
    return found


def feast_found(stack: ComposeStack, modality: str, rows: list[tuple[str, str, str]]) -> int:
    """How many of these rows the Feast online store answers with a vector (get_online_features)."""
    from embedstream.stores.feast_store import FeastStore

    repo = stack.volume_dir("feature-repo")
    if not (repo / "data" / "online.db").exists():
        return 0
    with sqlite3.connect(repo / "data" / "online.db", timeout=30):
        pass  # the sink container may hold a write; wait for it rather than read half a batch
    return sum(v is not None for v in FeastStore(repo).online_vectors(modality, rows))


# -- the stack end to end -------------------------------------------------------------------------------

COUNTS = {"image": 60, "text": 120, "timeseries": 40}


def test_every_message_is_accounted_for_in_the_topics_and_both_stores(compose_stack, report):
    stack = compose_stack
    made = {
        "image": image_messages(COUNTS["image"], "compose", bad_every=10),
        "text": text_messages(COUNTS["text"], bad_every=12),
        "timeseries": window_messages(COUNTS["timeseries"]),
    }
    readings = {m: Reading(stack.worker_settings(m)) for m in made}
    try:
        for modality, (messages, _) in made.items():
            produce(stack.bootstrap, stack.worker_settings(modality).kafka.input_topic, messages)
        table = {}
        for modality, (messages, bad) in made.items():
            keys = [k for k, _ in messages]
            counts = readings[modality].complete(keys)
            report(modality=modality, **counts)
            table[modality] = counts
            dead = {d.key for d in readings[modality].reader.result.dead_letters}
            assert counts["missing"] == 0, (modality, counts)
            assert counts["embedded"] + counts["dead_lettered"] == counts["produced"], (modality, counts)
            assert set(bad) <= dead, f"{modality}: bad messages not dead-lettered: {sorted(set(bad) - dead)}"

        # The sinks read the image and text output topics (deploy/config/sink.toml), each into its store.
        for modality in ("image", "text"):
            rows = readings[modality].rows_of([k for k, _ in made[modality][0]])
            assert len(rows) == table[modality]["embedded"]
            wait_until(f"LanceDB holds the {modality} rows", lambda rows=rows: set(rows) <= lancedb_ids(stack), 180, 1)
            wait_until(
                f"Feast holds the {modality} rows",
                lambda rows=rows, m=modality: feast_found(stack, m, rows) == len(rows),
                180,
                1,
            )
            report(modality=f"{modality} stores", lancedb=len(set(rows) & lancedb_ids(stack)),
                   feast=feast_found(stack, modality, rows), rows=len(rows))  # fmt: skip
    finally:
        for r in readings.values():
            r.close()


def _prometheus(stack: ComposeStack, path: str) -> dict:
    url = f"http://127.0.0.1:{stack.ports['PROMETHEUS_PORT']}{path}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]


def test_prometheus_scrapes_every_worker_sink_and_triton(compose_stack, report):
    stack = compose_stack

    def targets_up() -> bool:
        targets = _prometheus(stack, "/api/v1/targets")["activeTargets"]
        return len(targets) == 6 and all(t["health"] == "up" for t in targets)

    wait_until("every Prometheus target up", targets_up, 60, 1)
    query = urllib.parse.quote("sum by (modality) (embedstream_embeddings_total)")
    # The end-to-end test ran first: each modality has embedded rows, and a scrape has seen them.
    wait_until(
        "embedded rows of every modality in Prometheus",
        lambda: (
            {r["metric"]["modality"] for r in _prometheus(stack, f"/api/v1/query?query={query}")["result"]}
            == set(COUNTS)
        ),
        60,
        1,
    )
    rows = {
        r["metric"]["modality"]: float(r["value"][1])
        for r in _prometheus(stack, f"/api/v1/query?query={query}")["result"]
    }
    report(modality="prometheus", **{f"{m}_rows": int(v) for m, v in sorted(rows.items())})
    assert all(v > 0 for v in rows.values()), rows


# -- container faults -----------------------------------------------------------------------------------

FAULT_IMAGES = 160


def _mid_stream(stack: ComposeStack, prefix: str) -> tuple[list[bytes], Reading]:
    """Produce a stream of photos and return once some (not all) of them are out."""
    settings = stack.worker_settings("image")
    messages, _ = image_messages(FAULT_IMAGES, prefix)
    keys = [k for k, _ in messages]
    reading = Reading(settings)
    produce(stack.bootstrap, settings.kafka.input_topic, messages)
    counts = reading.until(keys, lambda c: c["embedded"] >= 20, 180)
    assert 20 <= counts["embedded"] < len(keys), f"the fault must land mid-stream: {counts}"
    return keys, reading


def _finish(stack: ComposeStack, keys: list[bytes], reading: Reading, report, cleared_at: float, **extra) -> dict:
    try:
        counts = reading.complete(keys)
    finally:
        reading.close()
    report(modality="image", **counts, recovery_s=round(time.monotonic() - cleared_at, 1), **extra)
    assert counts["missing"] == 0, counts
    return counts


def _start_again(stack: ComposeStack, service: str) -> float:
    """Start a stopped or killed container (its restart policy may have done it already); seconds to ready."""
    started = time.monotonic()
    if not stack.state(service).startswith("running"):
        stack.podman("start", stack.container(service))
    stack.wait_ready(service)
    return round(time.monotonic() - started, 1)


def test_worker_container_sigkilled_mid_stream(compose_stack, report):
    stack = compose_stack
    keys, reading = _mid_stream(stack, "kill9")
    stack.podman("kill", "--signal", "KILL", stack.container("worker-image"))
    killed_at = time.monotonic()
    startup = _start_again(stack, "worker-image")
    _finish(stack, keys, reading, report, killed_at, startup_s=startup)


def test_worker_container_stopped_with_sigterm_mid_stream_leaves_no_duplicates(compose_stack, report):
    stack = compose_stack
    keys, reading = _mid_stream(stack, "sigterm")
    # podman stop sends the image's stop signal (SIGTERM), then SIGKILL after the grace period.
    stack.podman("stop", "-t", "60", stack.container("worker-image"), timeout_s=120)
    stopped = stack.state("worker-image")
    stopped_at = time.monotonic()
    startup = _start_again(stack, "worker-image")
    counts = _finish(stack, keys, reading, report, stopped_at, startup_s=startup, stopped=stopped)
    assert stopped == "exited 0", f"the worker did not stop cleanly on SIGTERM: {stopped}"
    assert counts["duplicates"] == 0, counts


def test_triton_container_restarted_mid_stream(compose_stack, report):
    stack = compose_stack
    keys, reading = _mid_stream(stack, "triton")
    stack.podman("restart", "-t", "10", stack.container("triton-cpu"), timeout_s=180)
    restarted_at = time.monotonic()
    ready = stack.wait_ready("triton-cpu")
    _finish(stack, keys, reading, report, restarted_at, triton_ready_s=round(ready, 1))


def test_broker_container_restarted_mid_stream_on_durable_storage(compose_stack, report):
    stack = compose_stack
    keys, reading = _mid_stream(stack, "broker")
    stack.podman("restart", "-t", "10", stack.container("kafka"), timeout_s=180)
    restarted_at = time.monotonic()
    ready = stack.wait_ready("kafka")
    # Nothing produced before the restart was lost: the reading goes on from where it stopped.
    _finish(stack, keys, reading, report, restarted_at, broker_ready_s=round(ready, 1))
    assert np.isfinite(ready)
