"""The image path end to end on the real local broker and Triton, worker as a separate process."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from kafka.structs import TopicPartition

from embedstream.config import Settings
from embedstream.consume.deadletter import REASON, SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC, WORKER_ID
from embedstream.encoders import EncoderSpec
from embedstream.errors import ModelMismatchError
from embedstream.kafka_io import make_reader, partitions_of
from embedstream.lineage import weights_fingerprint
from embedstream.local.samples.generated import corrupt, samples
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.modalities.image import DecodedImage, decode_image
from embedstream.records import SourceMessage
from embedstream.service import create_worker, encoder_spec
from embedstream.sinks.arrow_codec import decode_embeddings

from .helpers import accounting, produce, read_all, read_until_complete, wait_for_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_image_is_embedded_once_and_matches_the_bare_model(lane, reference_model):
    n = 520
    batch = list(samples(n, prefix="e2e"))
    produce(lane.bootstrap, lane.settings.kafka.input_topic, [(s.key, s.value) for s in batch])
    worker = WorkerProcess(lane.settings, lane.workdir).start()
    try:
        result = read_all(lane.settings, n)
    finally:
        worker.terminate()

    counts = accounting([s.key for s in batch], result)
    assert counts == {"produced": n, "embedded": n, "dead_lettered": 0, "duplicates": 0, "missing": 0}, counts
    table = result.table()
    assert table.num_rows == n
    # Every source offset of every partition is accounted for exactly once.
    by_part: dict[int, list[int]] = {}
    for p, o in zip(
        table.column("source_partition").to_pylist(), table.column("source_offset").to_pylist(), strict=True
    ):
        by_part.setdefault(p, []).append(o)
    assert sum(len(v) for v in by_part.values()) == n
    for offsets in by_part.values():
        assert sorted(offsets) == list(range(len(offsets)))
    assert set(table.column("model_name").to_pylist()) == {"image-mobilenetv3_small_100"}
    assert table.schema.metadata[b"embedstream.embedding_dim"] == b"1024"

    # Same preprocessed pixels through the bare model in-process: the served embedding must agree.
    spec = encoder_spec(lane.settings)
    value_by_key = {s.key: s.value for s in batch}
    keys = table.column("key").to_pylist()
    emb = table.column("embedding").combine_chunks().values.to_numpy().reshape(n, -1)
    pick = np.arange(0, n, 5)
    pixels = []
    for i in pick:
        dec = decode_image(
            SourceMessage("t", 0, 0, keys[i], value_by_key[keys[i]], 0), spec.preprocessing, lane.settings.limits
        )
        assert isinstance(dec, DecodedImage)
        pixels.append(dec.pixels)
    with torch.inference_mode():
        want = reference_model(torch.from_numpy(np.stack(pixels))).numpy()
    got = emb[pick]
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.999, cos.min()


def test_corrupt_images_go_to_the_dead_letter_topic_and_neighbours_are_embedded(lane, stack):
    # This test also covers Triton's HTTP protocol (the others use gRPC).
    settings = lane.settings.model_copy(
        update={"triton": lane.settings.triton.model_copy(update={"url": stack.triton.http_url, "protocol": "http"})}
    )
    good = list(samples(60, prefix="good"))
    bad = {
        b"bad-truncated": corrupt(1),
        b"bad-garbage": b"\x00\x01not an image",
        b"bad-empty": b"",
        b"bad-envelope": b'{"image": 12}',
    }
    messages: list[tuple[bytes, bytes]] = []
    bad_items = list(bad.items())
    for i, s in enumerate(good):
        messages.append((s.key, s.value))
        if i % 15 == 7:
            messages.append(bad_items.pop())
    assert not bad_items
    produce(lane.bootstrap, settings.kafka.input_topic, messages)
    worker = WorkerProcess(settings, lane.workdir).start()
    try:
        result = read_all(settings, len(messages))
    finally:
        worker.terminate()

    assert sorted(result.table().column("key").to_pylist()) == sorted(s.key for s in good)
    dlq = {d.key: d for d in result.dead_letters}
    assert set(dlq) == set(bad)
    expected_reason = {
        b"bad-truncated": "undecodable",
        b"bad-garbage": "undecodable",
        b"bad-empty": "empty",
        b"bad-envelope": "invalid_envelope",
    }
    for key, d in dlq.items():
        assert d.reason == expected_reason[key]
        assert d.value == bad[key], "dead letters keep the original bytes"
        assert d.headers[SOURCE_TOPIC].decode() == lane.settings.kafka.input_topic
        assert int(d.headers[SOURCE_PARTITION]) in (0, 1, 2)
        assert int(d.headers[SOURCE_OFFSET]) >= 0
        assert d.headers[WORKER_ID] == b"worker-0"
        assert d.headers[REASON]


def test_killed_worker_restarts_without_losing_anything(lane):
    n = 400
    batch = list(samples(n, prefix="kill"))
    produce(lane.bootstrap, lane.settings.kafka.input_topic, [(s.key, s.value) for s in batch])
    first = WorkerProcess(lane.settings, lane.workdir, "worker-a").start()
    try:
        seen_before_kill = wait_for_rows(lane.settings, 60)
    finally:
        first.kill()  # SIGKILL: no drain, no commit
    assert 60 <= seen_before_kill < n, "the kill must land mid-stream"
    second = WorkerProcess(lane.settings, lane.workdir, "worker-b").start()
    try:
        result = read_until_complete(lane.settings, [s.key for s in batch])
    finally:
        second.terminate()
    counts = accounting([s.key for s in batch], result)
    print("kill/restart:", counts)
    assert counts["missing"] == 0, counts
    assert counts["embedded"] == n and counts["dead_lettered"] == 0


# -- lineage ------------------------------------------------------------------------------------------------


def read_output_messages(
    settings: Settings, rows: int, timeout_s: float = 120.0
) -> list[tuple[dict[str, bytes], pa.Table]]:
    """Every output message as (headers, table), until ``rows`` rows arrived: the headers are the point here."""
    k = settings.kafka
    reader = make_reader(k, auto_offset_reset="earliest", settings_fetch_sizes=False)
    try:
        parts = [TopicPartition(k.output_topic, p) for p in partitions_of(reader, k.output_topic)]
        reader.assign(parts)
        reader.seek_to_beginning(*parts)
        out: list[tuple[dict[str, bytes], pa.Table]] = []
        deadline = time.monotonic() + timeout_s
        while sum(t.num_rows for _, t in out) < rows and time.monotonic() < deadline:
            for records in reader.poll(timeout_ms=500).values():
                out.extend((dict(rec.headers or []), decode_embeddings(rec.value)) for rec in records)
        return out
    finally:
        reader.close()


def served_spec_file(stack: LocalStack, name: str) -> EncoderSpec:
    return EncoderSpec.from_json((stack.model_repository / name / "spec.json").read_bytes())


def assert_outputs_name(messages: list[tuple[dict[str, bytes], pa.Table]], weights: str, preprocessing: str) -> None:
    assert messages
    for headers, table in messages:
        meta = table.schema.metadata
        assert meta[b"embedstream.weights_sha256"].decode() == headers["embedstream.weights_sha256"].decode() == weights
        assert (
            meta[b"embedstream.preprocessing_sha256"].decode()
            == headers["embedstream.preprocessing_sha256"].decode()
            == preprocessing
        )


def test_rows_and_headers_carry_the_fingerprint_of_the_checkpoint_served(lane, stack, reference_model):
    spec = served_spec_file(stack, "image-mobilenetv3_small_100")
    # The value the rows carry is computed, in this process, from the checkpoint the stack exported.
    assert spec.weights_sha256 == weights_fingerprint(reference_model.state_dict())
    assert spec.preprocessing_sha256
    # Pinned to exactly those: the worker starts and embeds.
    pinned = lane.settings.model_copy(
        update={
            "encoder": lane.settings.encoder.model_copy(
                update={
                    "weights_fingerprint": spec.weights_sha256,
                    "preprocessing_fingerprint": spec.preprocessing_sha256,
                }
            )
        }
    )
    batch = list(samples(24, prefix="lineage"))
    produce(lane.bootstrap, pinned.kafka.input_topic, [(s.key, s.value) for s in batch])
    worker = WorkerProcess(pinned, lane.workdir).start()
    try:
        messages = read_output_messages(pinned, len(batch))
    finally:
        worker.terminate()
    assert sum(t.num_rows for _, t in messages) == len(batch)
    assert_outputs_name(messages, spec.weights_sha256, spec.preprocessing_sha256)


def test_a_worker_pinned_to_other_weights_refuses_to_start_naming_both(lane, stack):
    spec = served_spec_file(stack, "image-mobilenetv3_small_100")
    validated = "0" * 16
    pinned = lane.settings.model_copy(
        update={"encoder": lane.settings.encoder.model_copy(update={"weights_fingerprint": validated})}
    )
    with pytest.raises(ModelMismatchError, match=rf"'{spec.weights_sha256}' is served, .*pins '{validated}'"):
        create_worker(pinned, ready_timeout_s=60)
