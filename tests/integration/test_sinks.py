"""`embedstream sink lancedb|feast` against a real broker and real stores, as processes a test can SIGKILL.

The output topic is filled with Arrow messages as a worker writes them (``stores.sample_rows``), so no
Triton is needed: what is under test is topic -> store. Each store must end with exactly the rows the
topic carried, vector for vector, after a SIGKILL mid-stream, after a replay of the whole range, and
after an outage during which nothing past the held messages was committed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from embedstream.config import KafkaSettings
from embedstream.kafka_io import ensure_topics, make_admin, make_reader, make_writer
from embedstream.local.stack.broker import LocalBroker
from embedstream.local.stack.process import ChildProcess, free_port
from embedstream.stores.sample_rows import SampleMessage, sample_messages

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 3
DIM = 32
MODEL = "sample_encoder"
TABLE = f"{MODEL}-v1"
STORES = ("lancedb", "feast")


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[LocalBroker]:
    b = LocalBroker(tmp_path_factory.mktemp("sink-broker")).start()
    yield b
    b.stop()


class SinkProcess:
    """`embedstream sink STORE` as a user runs it, with a config file and a health port."""

    def __init__(self, store: str, bootstrap: str, topics: list[str], group: str, workdir: Path) -> None:
        self.store = store
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / f"sink-{group}.toml"
        self.config.write_text(
            f'health_host = "127.0.0.1"\nhealth_port = {self.port}\n'
            f'[kafka]\nbootstrap_servers = "{bootstrap}"\n'
            f"[sink]\ntopics = {orjson.dumps(topics).decode()}\n"
            f'group_id = "{group}"\ndead_letter_topic = "dlq-{group}"\n'
            f'lancedb_uri = "{workdir / "lancedb"}"\nfeast_repo = "{workdir / "feast"}"\n'
            # Small writes, so a SIGKILL lands between two of them with rows stored but not committed.
            "batch_rows = 256\nmax_wait_ms = 50\nindex_min_rows = 1024\nretry_backoff_s = 0.2\nmax_backoff_s = 1.0\n"
        )
        argv = [sys.executable, "-m", "embedstream", "sink", store, "--config", str(self.config)]
        env = {**os.environ, "LANCE_LOG": "error"}
        self.proc = ChildProcess(f"sink {store}", argv, workdir / "logs" / f"sink-{group}.log", env)

    def start(self) -> SinkProcess:
        self.proc.start()
        self.proc.wait_until(lambda: self.status().get("ready", False), 60, "joined its group")
        return self

    def status(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 503 while not ready: the body still says why
            return orjson.loads(exc.read())
        except OSError:
            return {}

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        self.proc.stop()


# -- the stores, read the way a user reads them -------------------------------------------------------


def stored_lancedb(workdir: Path) -> dict[str, np.ndarray]:
    import lancedb

    db = lancedb.connect(str(workdir / "lancedb"))
    if TABLE not in db.list_tables().tables:
        return {}
    table = db.open_table(TABLE).to_arrow()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows in the LanceDB table"
    vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(-1, DIM)
    return dict(zip(ids, vectors, strict=True))


def stored_feast(workdir: Path, expected_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """Entity keys in the online store (SQLite), and with ``expected_ids`` their vectors via get_online_features."""
    db = workdir / "feast" / "data" / "online.db"
    if not db.exists():
        return {}
    with sqlite3.connect(db, timeout=30) as conn:
        keys = conn.execute("select count(distinct entity_key) from embedstream_embeddings_image").fetchone()[0]
    if expected_ids is None:
        return dict.fromkeys((str(i) for i in range(keys)), np.zeros(0))
    from embedstream.stores.feast_store import FeastStore

    found = FeastStore(workdir / "feast").online_vectors("image", [(i, MODEL, "1") for i in expected_ids])
    assert keys == sum(v is not None for v in found), "entity keys in the online store beyond the rows read"
    return {i: np.asarray(v, np.float32) for i, v in zip(expected_ids, found, strict=True) if v is not None}


def stored(store: str, workdir: Path, expected_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    return stored_lancedb(workdir) if store == "lancedb" else stored_feast(workdir, expected_ids)


def prepare_store(store: str, workdir: Path) -> None:
    if store == "feast":
        from embedstream.stores.feast_repo import write_repo

        write_repo(workdir / "feast")


# -- the topic ----------------------------------------------------------------------------------------


class Topic:
    def __init__(self, bootstrap: str, name: str) -> None:
        self.k = KafkaSettings(bootstrap_servers=bootstrap)
        self.name = name
        ensure_topics(self.k, {name: PARTITIONS})
        self.ends: dict[int, int] = {}
        self._producer = make_writer(self.k, linger_ms=2, max_request_size=16 << 20)
        self._sent = 0

    def produce(self, messages: list[SampleMessage | tuple[bytes, bytes]], pause_s: float = 0.0) -> None:
        for m in messages:
            key, value = (m.key, m.value) if isinstance(m, SampleMessage) else m
            md = self._producer.send(self.name, key=key, value=value, partition=self._sent % PARTITIONS).get(30)
            self.ends[md.partition] = max(self.ends.get(md.partition, 0), md.offset + 1)
            self._sent += 1
            if pause_s:
                time.sleep(pause_s)

    def committed(self, group: str) -> dict[int, int]:
        return committed(self.k, self.name, group)

    def close(self) -> None:
        self._producer.close()


def committed(k: KafkaSettings, topic: str, group: str) -> dict[int, int]:
    """The group's committed offsets on the topic, per partition, as the broker holds them."""
    admin = make_admin(k)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic}


def wait_for(what: str, cond: Callable[[], bool], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def read_dead_letters(bootstrap: str, topic: str, at_least: int) -> list[dict[str, bytes]]:
    from kafka.structs import TopicPartition

    reader = make_reader(KafkaSettings(bootstrap_servers=bootstrap), auto_offset_reset="earliest")
    try:
        reader.assign([TopicPartition(topic, 0)])
        out: list[dict[str, bytes]] = []
        deadline = time.monotonic() + 30
        while len(out) < at_least and time.monotonic() < deadline:
            for records in reader.poll(timeout_ms=500).values():
                out += [dict(r.headers) for r in records]
        return out
    finally:
        reader.close()


def nan_message() -> SampleMessage:
    m = sample_messages(2, 2, DIM, model_name=MODEL, seed=99, id_prefix="nan")[0]
    vectors = m.vectors.copy()
    vectors[0, 0] = np.nan
    from embedstream.records import RowMeta
    from embedstream.sinks.arrow_codec import encode_batch, output_schema

    metas = [
        RowMeta(i.encode(), i, "images", 0, j, 0, {"source_width": 1, "source_height": 1}) for j, i in enumerate(m.ids)
    ]
    return SampleMessage(b"nan", encode_batch(output_schema("image", MODEL, "1", DIM), metas, vectors), m.ids, vectors)


# -- the tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_exactly_n_rows_after_sigkill_and_replay(broker, tmp_path, store):
    n = 2400
    messages = sample_messages(n, 16, DIM, model_name=MODEL)
    expected = {i: v for m in messages for i, v in zip(m.ids, m.vectors, strict=True)}
    group = f"sink-{store}-{tmp_path.name}"
    topic = Topic(broker.bootstrap, f"out-{group}")
    prepare_store(store, tmp_path)
    bad = [(b"garbage", b"not arrow at all"), nan_message()]

    sink = SinkProcess(store, broker.bootstrap, [topic.name], group, tmp_path).start()
    producer = threading.Thread(target=topic.produce, args=(messages[:60] + bad + messages[60:], 0.02))
    producer.start()
    try:
        # SIGKILL mid-stream: some rows stored, the stream still arriving.
        wait_for("a third of the rows stored", lambda: len(stored(store, tmp_path)) >= n // 3)
        sink.kill()  # with rows written since its last commit, most likely: the restart re-reads them
        sink = SinkProcess(store, broker.bootstrap, [topic.name], group, tmp_path).start()
        producer.join()
        wait_for("every offset committed", lambda: topic.committed(group) == topic.ends)
        rows = stored(store, tmp_path, list(expected))
        assert sorted(rows) == sorted(expected)
        assert all(np.array_equal(rows[i], expected[i]) for i in expected)
        sink.stop()

        # Replay of the whole range into a replay topic, sunk into the same store by a new group.
        replayed = f"{topic.name}-replay"
        subprocess.run(
            [sys.executable, "-m", "embedstream", "replay", "--bootstrap", broker.bootstrap,
             "--from-topic", topic.name, "--to-topic", replayed],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        replay_group = f"{group}-replay"
        sink = SinkProcess(store, broker.bootstrap, [replayed], replay_group, tmp_path).start()
        wait_for("the replayed range consumed", lambda: sink.status().get("consumed", 0) >= len(messages) + len(bad))
        total = sum(topic.ends.values())
        wait_for(
            "the replayed range committed", lambda: sum(committed(topic.k, replayed, replay_group).values()) == total
        )
        rows = stored(store, tmp_path, list(expected))
        assert sorted(rows) == sorted(expected)  # no duplicates, none missing, the NaN rows not among them
        assert all(np.array_equal(rows[i], expected[i]) for i in expected)
    finally:
        sink.stop()
        producer.join()
        topic.close()

    reasons = {h["embedstream.dlq.reason"].decode() for h in read_dead_letters(broker.bootstrap, f"dlq-{group}", 2)}
    assert reasons == {"undecodable", "non_finite"}


class Outage:
    """A real store outage: LanceDB's files unwritable, or Feast's SQLite online store locked by another writer."""

    def __init__(self, store: str, workdir: Path) -> None:
        self.store, self.workdir = store, workdir
        self._lock: sqlite3.Connection | None = None

    def begin(self) -> None:
        if self.store == "feast":
            self._lock = sqlite3.connect(self.workdir / "feast" / "data" / "online.db", isolation_level=None)
            self._lock.execute("BEGIN EXCLUSIVE")
            return
        root = self.workdir / "lancedb"
        if os.geteuid() == 0:  # root writes through permissions; the immutable flag stops it
            if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(root)]).returncode:
                pytest.skip("running as root without chattr +i: cannot make the LanceDB directory unwritable")
        else:
            for d, _, _ in os.walk(root):
                os.chmod(d, 0o555)
        try:
            (root / "probe").touch()
        except OSError:
            return
        self.end()
        pytest.skip("the LanceDB directory stayed writable")

    def end(self) -> None:
        if self._lock is not None:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            self._lock = None
            return
        root = self.workdir / "lancedb"
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-R", "-i", str(root)], check=False)
        else:
            for d, _, _ in os.walk(root):
                os.chmod(d, 0o755)


@pytest.mark.parametrize("store", STORES)
def test_store_outage_holds_the_sink_without_committing(broker, tmp_path, store):
    n = 1200
    messages = sample_messages(n, 16, DIM, model_name=MODEL, seed=3)
    expected = {i: v for m in messages for i, v in zip(m.ids, m.vectors, strict=True)}
    group = f"outage-{store}-{tmp_path.name}"
    topic = Topic(broker.bootstrap, f"out-{group}")
    prepare_store(store, tmp_path)
    half = len(messages) // 2
    sink = SinkProcess(store, broker.bootstrap, [topic.name], group, tmp_path).start()
    outage = Outage(store, tmp_path)
    try:
        topic.produce(messages[:half])
        wait_for("the first half committed", lambda: topic.committed(group) == topic.ends)
        before = dict(topic.ends)

        outage.begin()
        try:
            topic.produce(messages[half:])
            wait_for("the sink degraded", lambda: sink.status().get("degraded") is True)
            status = sink.status()
            assert status["ready"] is False
            assert topic.committed(group) == before  # nothing past the held messages
        finally:
            outage.end()

        wait_for("every offset committed", lambda: topic.committed(group) == topic.ends)
        assert sink.status()["degraded"] is False
        assert sink.status()["outages"] >= 1
        rows = stored(store, tmp_path, list(expected))
        assert sorted(rows) == sorted(expected)
        assert all(np.array_equal(rows[i], expected[i]) for i in expected)
    finally:
        outage.end()
        sink.stop()
        topic.close()


# -- search by a new input and recall@5, on embeddings Triton really served -----------------------------
#
# One stack of this test's own serves the packaged encoders (EfficientNet-Lite0 with its ImageNet
# weights, all-MiniLM-L6-v2): the real-photo stream and paraphrase groups go through the workers,
# `embedstream sink lancedb` stores their rows, and new inputs (a copy of a photo the stream never
# carried, a paraphrase it held back) are embedded through the same served models and searched.

COPIES_PER_PHOTO = 5  # 4 siblings per copy: recall@5 asks for all four in the five nearest
RECALL_FLOOR = 0.9  # measured 0.984 (125 copies of 25 photos, exact search); chance 5/124 = 0.04


@pytest.fixture(scope="module")
def served_stack(tmp_path_factory):
    from embedstream.config import load_settings
    from embedstream.local import pipelines
    from embedstream.local.stack.stack import LocalStack

    base = load_settings()
    pipes = [pipelines.image_settings(base), pipelines.text_settings(base)]
    with LocalStack(pipes, workdir=tmp_path_factory.mktemp("search-stack"), partitions=2) as stack:
        yield stack


def _embed_into_lancedb(stack, workdir: Path, streams: list[list[tuple[bytes, bytes]]]) -> list[str]:
    """Each pipeline's worker embeds its stream; one `sink lancedb` stores every output topic. Returns the topics."""
    from embedstream.local.stack.worker_process import WorkerProcess

    from .helpers import private_topics, produce, read_all

    lanes = [private_topics(s, f"search-{i}", partitions=2) for i, s in enumerate(stack.all_settings)]
    for lane, messages in zip(lanes, streams, strict=True):
        produce(lane.kafka.bootstrap_servers, lane.kafka.input_topic, messages)
    workers = [WorkerProcess(lane, workdir, f"worker-{i}").start() for i, lane in enumerate(lanes)]
    try:
        for lane, messages in zip(lanes, streams, strict=True):
            result = read_all(lane, len(messages))
            assert result.rows == len(messages) and not result.dead_letters
    finally:
        for w in workers:
            w.terminate()
    topics = [lane.kafka.output_topic for lane in lanes]
    sink = SinkProcess("lancedb", stack.broker.bootstrap, topics, "search-sink", workdir).start()
    try:
        from embedstream.stores.lance_store import LanceStore

        def stored_rows() -> int:
            store = LanceStore(str(workdir / "lancedb"))
            return sum(store.open(n).count_rows() for n in store.table_names())

        wait_for("every row in LanceDB", lambda: stored_rows() == sum(len(s) for s in streams))
    finally:
        sink.stop()
    return topics


def _cli_search(workdir: Path, stack, table: str, *query: str) -> list[str]:
    """`embedstream search` as a user runs it; returns the hit ids, nearest first."""
    assert stack.triton is not None
    out = subprocess.run(
        [sys.executable, "-m", "embedstream", "search", "--lancedb-uri", str(workdir / "lancedb"),
         "--triton-url", stack.triton.grpc_url, "--table", table, "-k", "5", *query],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    print(out)
    return [line.split()[2] for line in out.splitlines()[1:] if line.strip()]


@pytest.mark.timeout(600)
def test_search_by_a_new_photo_and_sentence_and_recall_at_5_of_photo_copies(served_stack, tmp_path):
    from embedstream.local.samples.paraphrases import PARAPHRASES
    from embedstream.local.samples.photos import natural_photos, photo_stream
    from embedstream.ops.search import nearest, search_new, table_model, vector_of
    from embedstream.stores.lance_store import LanceStore, table_name

    stack = served_stack
    photos = natural_photos()
    copies = list(photo_stream(len(photos) * COPIES_PER_PHOTO, seed=0, photos=photos, prefix="copy"))
    source = {m.key.decode(): m.source for m in copies}
    # The last sentence of each group is held back: the stream never carries it, a query asks with it.
    kept = [(f"s{g:02d}-{j}".encode(), t.encode()) for g, grp in enumerate(PARAPHRASES) for j, t in enumerate(grp[:-1])]
    fact = {k.decode(): k.decode().split("-")[0] for k, _ in kept}
    _embed_into_lancedb(stack, tmp_path, [[(m.key, m.value) for m in copies], kept])

    by_modality = {s.modality: s for s in stack.specs}
    image_spec, text_spec = by_modality["image"], by_modality["text"]
    store = LanceStore(str(tmp_path / "lancedb"))
    images = store.open(table_name(image_spec.name, image_spec.version))
    texts = store.open(table_name(text_spec.name, text_spec.version))
    assert images.count_rows() == len(copies) and texts.count_rows() == len(kept)

    # recall@5: of each copy's siblings (the other copies of its photo), the share among its 5 nearest
    found = 0
    for row_id in source:
        hits = nearest(images, vector_of(images, row_id), 5, exclude_id=row_id)
        found += sum(source[h.id] == source[row_id] for h in hits)
    recall = found / (len(source) * (COPIES_PER_PHOTO - 1))
    print(f"recall@5 of photo copies in LanceDB: {recall:.3f} ({len(source)} copies of {len(photos)} photos)")
    assert recall >= RECALL_FLOOR

    # The query path is the worker's: a stored copy's own bytes, embedded for a query, find that row at ~0.
    settings = stack.local_settings(stack.pipelines[0])
    first = copies[0]
    hits = search_new(settings, images, 1, image=first.value)
    assert hits[0].id == first.key.decode() and hits[0].distance < 1e-4, hits

    # New copies (another seed: other crops, edits and encodings) of every photo: their nearest stored rows
    fresh = list(photo_stream(len(photos), seed=1234, photos=photos, prefix="new"))
    top1 = sum(source[search_new(settings, images, 1, image=m.value)[0].id] == m.source for m in fresh)
    print(f"new photo copies whose nearest stored row is a copy of the same photo: {top1}/{len(fresh)}")
    assert top1 >= 0.9 * len(fresh)  # measured 25/25
    text_settings = stack.local_settings(stack.pipelines[1])
    held = [(f"s{g:02d}", grp[-1]) for g, grp in enumerate(PARAPHRASES)]
    text_top1 = sum(fact[search_new(text_settings, texts, 1, text=t)[0].id] == g for g, t in held)
    print(f"held-back paraphrases whose nearest stored sentence states the same fact: {text_top1}/{len(held)}")
    assert text_top1 >= 0.9 * len(held)  # measured 34/34

    # The CLI: a new image file and a new sentence, against the table of the model that made its rows
    query = tmp_path / "query.jpg"
    query.write_bytes(fresh[0].value)
    ids = _cli_search(tmp_path, stack, images.name, "--image", str(query))
    assert len(ids) == 5 and source[ids[0]] == fresh[0].source
    ids = _cli_search(tmp_path, stack, texts.name, "--text", held[0][1])
    assert len(ids) == 5 and fact[ids[0]] == held[0][0]
    # The table says which model made it: a sentence for the image table is refused by name.
    refused = subprocess.run(
        [sys.executable, "-m", "embedstream", "search", "--lancedb-uri", str(tmp_path / "lancedb"),
         "--triton-url", stack.triton.grpc_url, "--table", images.name, "--text", "a sentence"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "query it with --image" in refused.stderr
    # A table of another version of the served model: its vectors would lie in another space.
    from embedstream.errors import ConfigError
    from embedstream.ops.search import TableModel, embed_query

    other = TableModel(image_spec.name, "2", image_spec.embedding_dim)
    with pytest.raises(ConfigError, match="serve that version"):
        embed_query(settings, other, image=first.value)
    assert table_model(images) == TableModel(image_spec.name, image_spec.version, image_spec.embedding_dim)
