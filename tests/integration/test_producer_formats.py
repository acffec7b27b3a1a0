"""The producers' own formats end to end on the real broker, Triton and S3 server.

- Images by reference from the local S3 server (SeaweedFS, with identities so one bucket is
  forbidden): each row equals the same image sent inline; a missing key, a forbidden bucket, an
  oversize object, a slow server and loopback addresses are dead-lettered with their reasons while
  the stream goes on (the image model of the shared stack).
- Avro, Protobuf and JSON Schema records, made by confluent-kafka's serializers against the registry
  test double (``tests/registry_double.py``), for text and time series: rows equal to the same values
  sent raw; the five registry dead-letter reasons; a registry outage held and recovered, none missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import numpy as np
import orjson
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from embedstream.config import load_settings
from embedstream.local.readback import TopicReader
from embedstream.local.samples.generated import encode, render
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.storage import LocalStorage
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.service import create_worker

from ..registry_double import RegistryDouble
from ..unit.test_formats import SERIES_AVRO, SERIES_JSON, TEXT_AVRO, TEXT_JSON, ReadingProto, ReviewProto
from .helpers import accounting, private_topics, produce, read_until_complete

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAP = 512 * 1024
IDENTITIES = {
    "identities": [
        # The stack's own readiness checks are anonymous; the worker signs as the reader.
        {"name": "anonymous", "actions": ["Read", "Write", "List", "Tagging", "Admin"]},
        {"name": "reader", "credentials": [{"accessKey": "reader", "secretKey": "reader-secret"}],
         "actions": ["Read:photos", "List:photos"]},
    ]
}  # fmt: skip


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- images by reference ------------------------------------------------------------------------------


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        return None


def _serve(host: str, handler: type[BaseHTTPRequestHandler]) -> _Quiet:
    server = _Quiet((host, 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def object_store(tmp_path_factory) -> Iterator[LocalStorage]:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    root = tmp_path_factory.mktemp("objects")
    (root / "s3.json").write_text(json.dumps(IDENTITIES))
    storage = LocalStorage(root, bucket="photos", s3_config=root / "s3.json").start()
    try:
        anonymous = Config(signature_version=UNSIGNED)  # the open identity; the worker signs as the reader
        admin = boto3.session.Session().client(
            "s3", endpoint_url=storage.location.endpoint, region_name="us-east-1", config=anonymous
        )
        admin.create_bucket(Bucket="private")
        yield storage
    finally:
        storage.stop()


def test_images_by_reference_equal_inline_and_failures_are_dead_lettered(lane, object_store):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    unsigned = Config(signature_version=UNSIGNED)
    endpoint = object_store.location.endpoint
    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", config=unsigned)
    n = 12
    images = [encode(render(i, (160 + 8 * i, 120 + 4 * i)), "JPEG" if i % 2 else "PNG") for i in range(n)]
    for i, data in enumerate(images):
        s3.put_object(Bucket="photos", Key=f"img/{i}", Body=data)
    s3.put_object(Bucket="private", Key="img/0", Body=images[0])
    s3.put_object(Bucket="photos", Key="big", Body=os.urandom(CAP + 1))

    release = threading.Event()
    seen = {"honeypot": 0}

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            return None

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            release.wait(30)

    class Honeypot(Slow):
        def do_GET(self):
            seen["honeypot"] += 1
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    slow, pot = _serve("127.0.0.2", Slow), _serve("127.0.0.1", Honeypot)
    slow_port, pot_port = slow.server_address[1], pot.server_address[1]
    settings = lane.settings.model_copy(
        update={
            "fetch": load_settings(
                fetch={
                    "enabled": True,
                    "allowed_schemes": ["s3", "http"],
                    "allowed_buckets": ["photos", "private"],
                    "allowed_hosts": ["127.0.0.2", "127.0.0.1", "localhost"],
                    "allowed_networks": ["127.0.0.2/32"],
                    "s3_endpoint_url": object_store.location.endpoint,
                    "s3_region": "us-east-1",
                    "timeout_s": 1.0,
                    "retries": 0,
                    "max_object_bytes": CAP,
                }
            ).fetch
        }
    )
    messages = [(f"ref-{i}".encode(), f"s3://photos/img/{i}".encode()) for i in range(n)]
    messages += [(f"inline-{i}".encode(), data) for i, data in enumerate(images)]
    envelope = orjson.dumps({"uri": "s3://photos/img/3", "id": "enveloped"})
    bad = {
        b"missing": (b"s3://photos/img/none", "fetch_not_found"),
        b"forbidden": (b"s3://private/img/0", "fetch_forbidden"),
        b"oversize": (b"s3://photos/big", "fetch_too_large"),
        b"slow": (f"http://127.0.0.2:{slow_port}/slow".encode(), "fetch_timeout"),
        b"loopback": (f"http://127.0.0.1:{pot_port}/x".encode(), "fetch_refused"),
        b"loopback-name": (f"http://localhost:{pot_port}/x".encode(), "fetch_refused"),
        b"bucket-not-allowed": (b"s3://elsewhere/img/0", "fetch_refused"),
    }
    half = len(messages) // 2
    stream = [*messages[:half], *((k, v) for k, (v, _) in bad.items()), (b"env", envelope), *messages[half:]]
    produce(lane.bootstrap, settings.kafka.input_topic, stream)

    env = {"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader-secret", "AWS_EC2_METADATA_DISABLED": "true"}
    with mock.patch.dict(os.environ, env):
        worker = WorkerProcess(settings, lane.workdir).start()
    try:
        result = read_until_complete(settings, [k for k, _ in stream], timeout_s=180)
    finally:
        release.set()
        worker.terminate()
        slow.shutdown()
        pot.shutdown()
    counts = accounting([k for k, _ in stream], result)
    print(f"by reference: {counts}")
    assert counts["missing"] == 0 and counts["duplicates"] == 0
    reasons = {d.key: d.reason for d in result.dead_letters}
    assert reasons == {k: reason for k, (_, reason) in bad.items()}
    assert seen["honeypot"] == 0, "a refused address was never sent a request"
    rows = {r["key"]: r for r in result.table().to_pylist()}
    for i in range(n):
        ref, inline = rows[f"ref-{i}".encode()], rows[f"inline-{i}".encode()]
        assert cosine(ref["embedding"], inline["embedding"]) >= 0.9999
        assert ref["source_uri"] == f"s3://photos/img/{i}" and inline["source_uri"] is None
        assert (ref["source_width"], ref["source_height"]) == (inline["source_width"], inline["source_height"])
    assert rows[b"env"]["id"] == "enveloped" and rows[b"env"]["source_uri"] == "s3://photos/img/3"


def test_broken_origins_never_stop_the_stream_and_a_host_back_is_redriven(lane, object_store, tmp_path):
    """Among good references: an origin that never sends headers, one that trickles its body, a port
    nothing listens on, https to a plain-HTTP port and a self-signed origin. Each ends as a dead letter
    with its reason within its bound; the held host is let go after fetch.max_hold_s; once it is back,
    `dlq redrive` embeds its references once each; nothing is missing."""
    import shutil
    import ssl
    import subprocess

    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    from embedstream.cli import main
    from embedstream.local.stack.process import free_port

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line for a self-signed certificate")
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=object_store.location.endpoint, region_name="us-east-1",
        config=Config(signature_version=UNSIGNED),
    )  # fmt: skip
    n = 30
    for i in range(n):
        s3.put_object(Bucket="photos", Key=f"good/{i}", Body=encode(render(i, (200, 150)), "JPEG"))
    stop = threading.Event()

    class Broken(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            return None

        def do_GET(self):
            if self.path.startswith("/img/"):
                body = encode(render(int(self.path.rsplit("/", 1)[1]), (200, 150)), "PNG")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Length", "9000")
                self.end_headers()
                while not stop.wait(0.1):
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                return
            stop.wait(60)  # /slow-headers: nothing at all

    cert, key = tmp_path / "origin.pem", tmp_path / "origin.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.2", "-addext", "subjectAltName=IP:127.0.0.2"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    plain = _serve("127.0.0.2", Broken)
    tls = _Quiet(("127.0.0.2", 0), Broken)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=tls.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    plain_port, tls_port, down_port = plain.server_address[1], tls.server_address[1], free_port()
    hold_s, timeout_s = 4.0, 1.0
    settings = lane.settings.model_copy(
        update={
            "fetch": load_settings(
                fetch={
                    "enabled": True, "allowed_schemes": ["s3", "http", "https"], "allowed_buckets": ["photos"],
                    "allowed_hosts": ["127.0.0.2"], "allowed_networks": ["127.0.0.2/32"],
                    "s3_endpoint_url": object_store.location.endpoint, "s3_region": "us-east-1",
                    "timeout_s": timeout_s, "retries": 1, "retry_backoff_s": 0.1, "max_hold_s": hold_s,
                }
            ).fetch
        }
    )  # fmt: skip
    good = [(f"good-{i}".encode(), f"s3://photos/good/{i}".encode()) for i in range(n)]
    good += [(f"http-{i}".encode(), f"http://127.0.0.2:{plain_port}/img/{i}".encode()) for i in range(5)]
    bad = {
        b"slow-headers": (f"http://127.0.0.2:{plain_port}/slow-headers", "fetch_timeout"),
        b"trickle": (f"http://127.0.0.2:{plain_port}/trickle", "fetch_timeout"),
        b"wrong-port": (f"http://127.0.0.2:{down_port}/img/1", "fetch_unavailable"),
        b"https-to-http": (f"https://127.0.0.2:{plain_port}/img/2", "fetch_tls"),
        b"self-signed": (f"https://127.0.0.2:{tls_port}/img/3", "fetch_tls"),
    }
    third = len(good) // 3
    stream = [*good[:third], *((k, v.encode()) for k, (v, _) in bad.items()), *good[third:]]
    produce(lane.bootstrap, settings.kafka.input_topic, stream)
    began = time.monotonic()
    env = {"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader-secret", "AWS_EC2_METADATA_DISABLED": "true"}
    with mock.patch.dict(os.environ, env):
        worker = WorkerProcess(settings, lane.workdir).start()
    back: _Quiet | None = None
    try:
        result = read_until_complete(settings, [k for k, _ in stream], timeout_s=180)
        took = time.monotonic() - began
        counts = accounting([k for k, _ in stream], result)
        reasons = {d.key: d.reason for d in result.dead_letters}
        print(f"broken origins: {counts}, all accounted for {took:.1f} s after the worker started")
        assert counts["missing"] == 0 and counts["duplicates"] == 0, counts
        assert reasons == {k: reason for k, (_, reason) in bad.items()}, reasons
        # The held host let go after max_hold_s; every other case within its own bound.
        assert took < 120, took
        # The host comes back: its dead letters, redriven, are embedded once each.
        back = _Quiet(("127.0.0.2", down_port), Broken)
        threading.Thread(target=back.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        assert main(["dlq", "redrive", settings.kafka.dead_letter_topic, "--to", settings.kafka.input_topic,
                     "--reason", "fetch_unavailable", "--bootstrap", lane.bootstrap]) == 0  # fmt: skip
        again = read_until_complete(settings, [*(k for k, _ in stream), b"wrong-port"], timeout_s=120)
        rows = [r for r in again.table().to_pylist() if r["key"] == b"wrong-port"]
        assert len(rows) == 1 and rows[0]["source_uri"] == bad[b"wrong-port"][0], rows
        # The same good references again, on the running worker with no broken origin among them.
        control = [(b"control-" + k, v) for k, v in good]
        produce(lane.bootstrap, settings.kafka.input_topic, control)
        began = time.monotonic()
        keys = [*(k for k, _ in stream), b"wrong-port", *(k for k, _ in control)]
        read_until_complete(settings, keys, timeout_s=120)
        print(
            f"{len(good)} good references: all accounted for {took:.1f} s after the worker started, with the "
            f"broken origins among them (hold {hold_s:g} s, timeout {timeout_s:g} s x 2 tries); "
            f"{time.monotonic() - began:.1f} s on the running worker without them"
        )
    finally:
        stop.set()
        worker.terminate()
        for server in (plain, tls, back):
            if server is not None:
                server.shutdown()
                server.server_close()


# -- schema-registry records --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def formats_stack(tmp_path_factory) -> Iterator[LocalStack]:
    from embedstream.local.pipelines import text_settings, timeseries_settings

    root = tmp_path_factory.mktemp("formats")
    base = load_settings(health_port=None)
    pipelines = [text_settings(base), timeseries_settings(base, root)]
    with LocalStack(pipelines, workdir=root / "stack", partitions=2) as stack:
        yield stack


@pytest.fixture(scope="module")
def registry() -> Iterator[RegistryDouble]:
    with RegistryDouble() as double:
        yield double


def serializer(fmt: str, schema: str | type, url: str):
    client = SchemaRegistryClient({"url": url})
    conf = {"subject.name.strategy": topic_subject_name_strategy}
    if fmt == "avro":
        return AvroSerializer(client, schema, conf=conf)
    if fmt == "json_schema":
        return JSONSerializer(schema, client, conf=conf)
    return ProtobufSerializer(schema, client, {**conf, "use.deprecated.format": False})


def lane_of(stack: LocalStack, modality: str, name: str, fmt: str, url: str, fields: dict):
    settings = next(
        s for s in stack.all_settings if s.kafka.input_topic == ("text" if modality == "text" else "timeseries")
    )
    private = private_topics(settings, name, partitions=2)
    data = private.model_dump()
    data["input"] = {"format": fmt, "registry": {"url": url}, "fields": fields} if fmt != "raw" else {}
    data["health_port"] = None
    data["worker_id"] = f"{name}-{fmt}"
    return load_settings(**data)


@contextlib.contextmanager
def workers(settings_list) -> Iterator[list]:
    stop = threading.Event()
    started = [create_worker(s) for s in settings_list]
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in started]
    for t in threads:
        t.start()
    try:
        yield started
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        for w in started:
            w.close()


def read_rows(settings, rows: int, dead: int = 0, timeout_s: float = 120.0):
    reader = TopicReader(settings.kafka)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (reader.result.rows < rows or len(reader.result.dead_letters) < dead):
            reader.poll(0.3)
        return reader.result
    finally:
        reader.close()


SENTENCES = [
    "A man is playing a guitar.", "The cat is sleeping on the sofa.", "How do I reset my password?",
    "The train to Berlin is delayed by an hour.", "Ünïcödé text with ✓ marks", "She is cooking pasta in the kitchen.",
    "The stock market fell sharply today.", "An unexpected letter arrived from a distant cousin.",
]  # fmt: skip
TEXT_FIELDS = {"text": "body.text", "id": "review_id", "event_time": "created"}
SERIES_FIELDS = {"series_id": "sensor", "timestamp": "at", "values": "channels"}


def text_record(fmt: str, ser, topic: str, rid: str, text: str, ms: int) -> bytes:
    ctx = SerializationContext(topic, MessageField.VALUE)
    if fmt == "protobuf":
        return ser(ReviewProto(review_id=rid, text=text, created=ms), ctx)
    return ser({"review_id": rid, "body": {"text": text}, "created": ms}, ctx)


def series_record(fmt: str, ser, topic: str, sid: str, at: int, values: list[float]) -> bytes:
    ctx = SerializationContext(topic, MessageField.VALUE)
    if fmt == "protobuf":
        return ser(ReadingProto(sensor=sid, at=at, channels=values), ctx)
    return ser({"sensor": sid, "at": at, "channels": values}, ctx)


FORMATS = ("avro", "protobuf", "json_schema")


def test_registry_records_embed_like_the_same_values_sent_raw(formats_stack, registry):
    ts_spec = next(s for s in formats_stack.specs if s.modality == "timeseries")
    window, channels = ts_spec.inputs[0].dims
    rng = np.random.default_rng(11)
    points = [(sid, 1_000 * (i + 1), rng.normal(size=channels).round(5).tolist()) for i in range(2 * window)
              for sid in ("s-a", "s-b")]  # fmt: skip
    texts = [(f"r-{i}", t, 1_700_000_000_000 + i) for i, t in enumerate(SENTENCES)]

    lanes = {}
    for modality, fields in (("text", {}), ("timeseries", {})):
        lanes[(modality, "raw")] = lane_of(formats_stack, modality, f"fmt-{modality}", "raw", registry.url, fields)
    for fmt in FORMATS:
        text_fields = dict(TEXT_FIELDS, text="text") if fmt == "protobuf" else TEXT_FIELDS
        lanes[("text", fmt)] = lane_of(formats_stack, "text", f"fmt-text-{fmt}", fmt, registry.url, text_fields)
        lanes[("timeseries", fmt)] = lane_of(
            formats_stack, "timeseries", f"fmt-ts-{fmt}", fmt, registry.url, SERIES_FIELDS
        )

    raw_text = [(rid.encode(), orjson.dumps({"id": rid, "text": t, "event_time_ms": ms})) for rid, t, ms in texts]
    raw_series = [
        (sid.encode(), orjson.dumps({"series_id": sid, "timestamp_ms": at, "values": v})) for sid, at, v in points
    ]
    produce(formats_stack.settings.kafka.bootstrap_servers, lanes[("text", "raw")].kafka.input_topic, raw_text)
    produce(formats_stack.settings.kafka.bootstrap_servers, lanes[("timeseries", "raw")].kafka.input_topic, raw_series)
    text_schema = {"avro": TEXT_AVRO, "json_schema": TEXT_JSON, "protobuf": ReviewProto}
    series_schema = {"avro": SERIES_AVRO, "json_schema": SERIES_JSON, "protobuf": ReadingProto}
    bad_counts = {}
    for fmt in FORMATS:
        topic = lanes[("text", fmt)].kafka.input_topic
        ser = serializer(fmt, text_schema[fmt], registry.url)
        records = [(rid.encode(), text_record(fmt, ser, topic, rid, t, ms)) for rid, t, ms in texts]
        good = records[0][1]
        bad = [
            (b"bad-framing", b"plain text on a registry topic"),
            (b"bad-unknown", good[:1] + (987_654).to_bytes(4, "big") + good[5:]),
            (b"bad-undecodable", good[:5] + b"\xff\xfe\xfd\x80\x80\x80"),
        ]
        if fmt == "avro":  # a record without the mapped field, and one where it has another type
            other = serializer("avro", json.dumps({"type": "record", "name": "Other", "fields": [
                {"name": "review_id", "type": "string"}, {"name": "created", "type": "long"},
                {"name": "body", "type": {"type": "record", "name": "B", "fields": [{"name": "text", "type": "long"}]}},
            ]}), registry.url)  # fmt: skip
            ctx = SerializationContext(topic, MessageField.VALUE)
            bad.append((b"bad-type", other({"review_id": "x", "created": 1, "body": {"text": 5}}, ctx)))
            no_body = {
                "type": "record",
                "name": "NoBody",
                "fields": [{"name": "review_id", "type": "string"}, {"name": "created", "type": "long"}],
            }
            nofield = serializer("avro", json.dumps(no_body), registry.url)  # fmt: skip
            bad.append((b"bad-missing", nofield({"review_id": "y", "created": 2}, ctx)))
        bad_counts[fmt] = bad
        produce(formats_stack.settings.kafka.bootstrap_servers, topic, [*records[:3], *bad, *records[3:]])
        topic = lanes[("timeseries", fmt)].kafka.input_topic
        ser = serializer(fmt, series_schema[fmt], registry.url)
        produce(formats_stack.settings.kafka.bootstrap_servers, topic,
                [(sid.encode(), series_record(fmt, ser, topic, sid, at, v)) for sid, at, v in points])  # fmt: skip
    fetched_before = dict(registry.requests)

    with workers(list(lanes.values())):
        results = {}
        for (modality, fmt), settings in lanes.items():
            if modality == "text":
                results[(modality, fmt)] = read_rows(settings, len(texts), len(bad_counts.get(fmt, [])))
            else:
                results[(modality, fmt)] = read_rows(settings, 2 * (2 * window // window))

    def by(result, key):
        return {key(r): r for r in result.table().to_pylist()}

    raw_t = by(results[("text", "raw")], lambda r: r["id"])
    raw_s = by(results[("timeseries", "raw")], lambda r: (r["series_id"], r["window_end"]))
    assert len(raw_t) == len(texts) and len(raw_s) >= 4
    expected_reasons = {b"bad-framing": "not_registry_framed", b"bad-unknown": "unknown_schema",
                        b"bad-undecodable": "undecodable_record", b"bad-type": "wrong_field_type",
                        b"bad-missing": "missing_field"}  # fmt: skip
    for fmt in FORMATS:
        got_t = by(results[("text", fmt)], lambda r: r["id"])
        assert set(got_t) == set(raw_t), fmt
        for rid, row in got_t.items():
            assert cosine(row["embedding"], raw_t[rid]["embedding"]) >= 0.9999, (fmt, rid)
            assert row["event_time"] == raw_t[rid]["event_time"] and row["schema_id"] is not None
        reasons = {d.key: d.reason for d in results[("text", fmt)].dead_letters}
        assert reasons == {k: expected_reasons[k] for k, _ in bad_counts[fmt]}, fmt
        assert {d.value for d in results[("text", fmt)].dead_letters} == {v for _, v in bad_counts[fmt]}
        got_s = by(results[("timeseries", fmt)], lambda r: (r["series_id"], r["window_end"]))
        assert set(got_s) == set(raw_s), fmt
        for key, row in got_s.items():
            np.testing.assert_allclose(row["embedding"], raw_s[key]["embedding"], rtol=0, atol=1e-5)
        print(f"{fmt}: text {len(got_t)} rows, {len(reasons)} dead letters; time series {len(got_s)} windows")
    # One registry round trip per new schema id (the producers' serializers registered theirs before).
    fetched = {p: n - fetched_before.get(p, 0) for p, n in registry.requests.items() if p.startswith("/schemas/ids/")}
    print(f"schema fetches by the workers: {fetched}")
    unknown = fetched.pop("/schemas/ids/987654")
    assert unknown == len(FORMATS), "an unknown id is asked for by each worker that meets it (404s are not cached)"
    assert fetched and all(n == 1 for n in fetched.values()), fetched


def test_a_registry_outage_is_held_and_recovered_with_none_missing(formats_stack):
    ts_spec = next(s for s in formats_stack.specs if s.modality == "timeseries")
    window, channels = ts_spec.inputs[0].dims
    rng = np.random.default_rng(5)
    points = [(sid, 1_000 * (i + 1), rng.normal(size=channels).round(5).tolist()) for i in range(4 * window)
              for sid in ("o-a", "o-b")]  # fmt: skip
    with RegistryDouble() as reg:
        settings = lane_of(formats_stack, "timeseries", "fmt-outage", "avro", reg.url, SERIES_FIELDS)
        topic = settings.kafka.input_topic
        first = serializer("avro", SERIES_AVRO, reg.url)
        later = json.loads(SERIES_AVRO)
        later["fields"].append({"name": "site", "type": "string", "default": "x"})
        second = serializer("avro", json.dumps(later), reg.url)
        half = len(points) // 2
        ctx = SerializationContext(topic, MessageField.VALUE)
        records = [(sid.encode(), first({"sensor": sid, "at": at, "channels": v}, ctx)) for sid, at, v in points[:half]]
        records += [(sid.encode(), second({"sensor": sid, "at": at, "channels": v, "site": "y"}, ctx))
                    for sid, at, v in points[half:]]  # fmt: skip
        bootstrap = formats_stack.settings.kafka.bootstrap_servers
        produce(bootstrap, topic, records[:half])
        with workers([settings]) as (worker,):
            read_rows(settings, 2)  # the first schema is known now
            reg.stop()
            produce(bootstrap, topic, records[half:])
            deadline = time.monotonic() + 60
            while not worker.status()["degraded"] and time.monotonic() < deadline:
                time.sleep(0.1)
            status = worker.status()
            assert status["degraded"] and "registry" in status["degraded_reason"], status
            reg.start()
            deadline = time.monotonic() + 60
            while worker.status()["degraded"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not worker.status()["degraded"]
            per_series = 4 * window
            result = read_rows(settings, 2 * per_series // window)
        windows = sorted((r["series_id"], r["window_end"]) for r in result.table().to_pylist())
        assert len(windows) == len(set(windows)) == 2 * per_series // window, "every window once: none missing"
        assert result.dead_letters == []
        assert worker.stats.outages >= 1
