"""Schema-registry inputs: records made by confluent-kafka's own serializers, on its mock:// registry.

Each format (Avro, Protobuf, JSON Schema) for text and time series: decoded to what the same values
sent raw decode to; the registry dead-letter reasons; a registry outage held and recovered with none
lost; dead letters carry the bytes as consumed.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json

import httpx
import numpy as np
import orjson
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from kafka.structs import TopicPartition

from embedstream.config import load_settings
from embedstream.consume.deadletter import REASON
from embedstream.encoders import get_family
from embedstream.formats import with_input_format
from embedstream.formats.mapping import image_envelope, text_envelope, timeseries_document
from embedstream.formats.record_input import RecordInput
from embedstream.formats.registry import Record, RecordDecoder, Refused, RegistryDown, registry_client_config
from embedstream.modalities import modality_for
from embedstream.modalities.text import CheckedText, check_text
from embedstream.records import BadRecord, SourceMessage, Unavailable
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.testing import FakeBackend, FakeConsumer, FakeProducer
from embedstream.worker import Worker

TOPIC = "readings"
_urls = itertools.count()

TEXT_AVRO = json.dumps(
    {
        "type": "record",
        "name": "Review",
        "namespace": "shop",
        "fields": [
            {"name": "review_id", "type": "string"},
            {
                "name": "body",
                "type": {"type": "record", "name": "Body", "fields": [{"name": "text", "type": "string"}]},
            },
            {"name": "created", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        ],
    }
)
TEXT_JSON = json.dumps(
    {
        "type": "object",
        "properties": {
            "review_id": {"type": "string"},
            "body": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            "created": {"type": "integer"},
        },
        "required": ["review_id", "body", "created"],
    }
)
SERIES_AVRO = json.dumps(
    {
        "type": "record",
        "name": "Reading",
        "fields": [
            {"name": "sensor", "type": "string"},
            {"name": "at", "type": "long"},
            {"name": "channels", "type": {"type": "array", "items": "double"}},
        ],
    }
)
SERIES_JSON = json.dumps(
    {
        "type": "object",
        "properties": {
            "sensor": {"type": "string"},
            "at": {"type": "integer"},
            "channels": {"type": "array", "items": {"type": "number"}},
        },
        "required": ["sensor", "at", "channels"],
    }
)
TEXT_FIELDS = {"text": "body.text", "id": "review_id", "event_time": "created"}
SERIES_FIELDS = {"series_id": "sensor", "timestamp": "at", "values": "channels"}


def registry():
    return SchemaRegistryClient.new_client({"url": f"mock://formats-{next(_urls)}"})


def ctx(topic=TOPIC):
    return SerializationContext(topic, MessageField.VALUE)


def proto_class(name, fields):
    """A Protobuf message class built at run time (no protoc): (name, number, type, label) per field."""
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{name.lower()}.proto", package="ex", syntax="proto3")
    msg = fdp.message_type.add(name=name)
    for field_name, number, type_, label in fields:
        msg.field.add(name=field_name, number=number, type=type_, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return GetMessageClass(pool.FindMessageTypeByName(f"ex.{name}"))


F = descriptor_pb2.FieldDescriptorProto
ReviewProto = proto_class(
    "Review",
    [("review_id", 1, F.TYPE_STRING, F.LABEL_OPTIONAL), ("text", 2, F.TYPE_STRING, F.LABEL_OPTIONAL),
     ("created", 3, F.TYPE_INT64, F.LABEL_OPTIONAL)],
)  # fmt: skip
ReadingProto = proto_class(
    "Reading",
    [("sensor", 1, F.TYPE_STRING, F.LABEL_OPTIONAL), ("at", 2, F.TYPE_INT64, F.LABEL_OPTIONAL),
     ("channels", 3, F.TYPE_DOUBLE, F.LABEL_REPEATED)],
)  # fmt: skip


def text_serializer(fmt, client):
    if fmt == "avro":
        ser = AvroSerializer(client, TEXT_AVRO)
        return lambda rid, text, ms: ser({"review_id": rid, "body": {"text": text}, "created": ms}, ctx())
    if fmt == "json_schema":
        ser = JSONSerializer(TEXT_JSON, client)
        return lambda rid, text, ms: ser({"review_id": rid, "body": {"text": text}, "created": ms}, ctx())
    ser = ProtobufSerializer(ReviewProto, client, {"use.deprecated.format": False})
    return lambda rid, text, ms: ser(ReviewProto(review_id=rid, text=text, created=ms), ctx())


def series_serializer(fmt, client):
    if fmt == "avro":
        ser = AvroSerializer(client, SERIES_AVRO)
        return lambda sid, at, values: ser({"sensor": sid, "at": at, "channels": values}, ctx())
    if fmt == "json_schema":
        ser = JSONSerializer(SERIES_JSON, client)
        return lambda sid, at, values: ser({"sensor": sid, "at": at, "channels": values}, ctx())
    ser = ProtobufSerializer(ReadingProto, client, {"use.deprecated.format": False})
    return lambda sid, at, values: ser(ReadingProto(sensor=sid, at=at, channels=values), ctx())


def text_settings(fmt):
    fields = dict(TEXT_FIELDS, text="text") if fmt == "protobuf" else TEXT_FIELDS
    return load_settings(input={"format": fmt, "registry": {"url": "mock://unused"}, "fields": fields})


def msg(value, offset=0, key=b"k", partition=0, headers=()):
    return SourceMessage(TOPIC, partition, offset, key, value, 1_000 + offset, tuple(headers))


FORMATS = ["avro", "protobuf", "json_schema"]


# -- decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_records_decode_to_what_the_same_envelope_decodes_to(fmt):
    client = registry()
    serialize = text_serializer(fmt, client)
    settings = text_settings(fmt)
    decoder = RecordDecoder(settings.input, client)
    texts = [("r-1", "A man is playing a guitar.", 1_700_000_000_001), ("r-2", "Ünïcödé ✓ text", 5)]
    for i, (rid, text, ms) in enumerate(texts):
        record = decoder(serialize(rid, text, ms), TOPIC)
        assert isinstance(record, Record), record
        envelope = text_envelope(record.value, settings.input.fields)
        from_record = check_text(msg(envelope, i, headers=[("content-type", b"application/json")]), settings.text)
        raw = orjson.dumps({"id": rid, "text": text, "event_time_ms": ms})
        from_raw = check_text(msg(raw, i), settings.text)
        assert isinstance(from_record, CheckedText) and isinstance(from_raw, CheckedText)
        assert (from_record.id, from_record.text, from_record.event_time_ms) == (from_raw.id, text, ms)


@pytest.fixture(scope="module")
def ts_spec():
    settings = load_settings(encoder={"family": "lstm", "arch": "w4c3h6", "weights": "random", "max_batch_size": 32})
    return get_family("lstm").describe(settings.encoder)


def ts_settings(fmt, **extra):
    return load_settings(
        batch={"max_size": 4, "max_wait_ms": 0},
        encoder={"family": "lstm", "arch": "w4c3h6", "weights": "random", "max_batch_size": 32},
        kafka={"input_topic": TOPIC},
        timeseries={"stride": 2},
        input={"format": fmt, "registry": {"url": "mock://unused"}, "fields": SERIES_FIELDS},
        commit_interval_ms=0,
        worker_id="w-formats",
        **extra,
    )


def series_points(n=24, series=("a", "b")):
    rng = np.random.default_rng(3)
    return [(sid, 1_000 * (i + 1), rng.normal(size=3).round(6).tolist()) for i in range(n) for sid in series]


def run_worker(worker, consumer, steps=200):
    for _ in range(steps):
        worker.step()
        if consumer.drained() and not worker.status()["in_flight"] and not worker.status()["degraded"]:
            break
    worker.drain()


def window_rows(producer):
    tables = [decode_embeddings(v) for _, v, _ in producer.sent.get("embeddings.image", [])]
    rows = [r for t in tables for r in t.to_pylist()]
    return sorted(rows, key=lambda r: (r["series_id"], r["window_end"]))


def ts_worker(spec, settings, values, decoder=None):
    consumer = FakeConsumer({0: values}, topic=TOPIC)
    producer = FakeProducer(ack_immediately=True)
    modality = modality_for(spec, settings)
    if decoder is not None:
        modality = RecordInput(modality, settings, decoder)
    worker = Worker(settings, modality, FakeBackend(spec), consumer, producer)
    consumer.subscribe([TOPIC], listener=None)
    worker.on_assigned(sorted(consumer.assignment()))
    return worker, consumer, producer


@pytest.mark.parametrize("fmt", FORMATS)
def test_time_series_records_are_windowed_and_embedded_as_the_same_json(fmt, ts_spec):
    points = series_points()
    raw = [(sid.encode(), orjson.dumps({"series_id": sid, "timestamp_ms": at, "values": v})) for sid, at, v in points]
    worker, consumer, producer = ts_worker(ts_spec, ts_settings("raw"), raw)
    run_worker(worker, consumer)
    expected = window_rows(producer)

    client = registry()
    serialize = series_serializer(fmt, client)
    records = [(sid.encode(), serialize(sid, at, v)) for sid, at, v in points]
    settings = ts_settings(fmt)
    worker, consumer, producer = ts_worker(ts_spec, settings, records, RecordDecoder(settings.input, client))
    run_worker(worker, consumer)
    got = window_rows(producer)

    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert (a["series_id"], a["window_start"], a["window_end"], a["source_offset"]) == (
            b["series_id"], b["window_start"], b["window_end"], b["source_offset"],
        )  # fmt: skip
        np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=0, atol=1e-6)
        assert a["schema_id"] is not None and "schema_id" not in b
    assert worker.stats.dead_lettered == 0
    assert consumer.committed[TopicPartition(TOPIC, 0)] >= len(records) - 4  # the open windows' points stay


# -- the five dead-letter cases ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_registry_dead_letter_reasons(fmt):
    client = registry()
    serialize = text_serializer(fmt, client)
    settings = text_settings(fmt)
    decoder = RecordDecoder(settings.input, client)
    good = serialize("r", "some text", 7)
    unknown = good[:1] + (999_999).to_bytes(4, "big") + good[5:]
    cases = {
        "not_registry_framed": b"plain text, no magic byte",
        "unknown_schema": unknown,
        "undecodable_record": good[:5] + b"\xff\xfe\xfd\x80\x80\x80",
    }
    for reason, value in cases.items():
        out = decoder(value, TOPIC)
        assert isinstance(out, Refused) and out.reason == reason, (reason, out)

    mapped = RecordDecoder(settings.input, client)(good, TOPIC)
    assert isinstance(mapped, Record)
    missing = load_settings(input={"format": fmt, "registry": {"url": "mock://u"}, "fields": {"text": "body.nope"}})
    problem = text_envelope(mapped.value, missing.input.fields)
    assert problem.reason == "missing_field" and "body.nope" in problem.message
    wrong = load_settings(input={"format": fmt, "registry": {"url": "mock://u"}, "fields": {"text": "created"}})
    problem = text_envelope(mapped.value, wrong.input.fields)
    assert problem.reason == "wrong_field_type" and "expected a string" in problem.message


def test_avro_decode_failures_of_a_known_schema_are_undecodable_not_outages():
    client = registry()
    good = text_serializer("avro", client)("r", "x", 1)
    decoder = RecordDecoder(text_settings("avro").input, client)
    for cut in (good[:6], good[:5]):
        out = decoder(cut, TOPIC)
        assert isinstance(out, Refused) and out.reason == "undecodable_record", out


def test_mapping_types_and_times():
    fields = load_settings().input.fields
    assert json.loads(image_envelope({"image": b"\x89PNG"}, fields)) == {"image": "iVBORw=="}
    assert json.loads(image_envelope({"image": "s3://b/k.jpg"}, fields)) == {"uri": "s3://b/k.jpg"}
    assert image_envelope({"image": 5}, fields).reason == "wrong_field_type"
    assert image_envelope({}, fields).reason == "missing_field"
    when = dt.datetime(2023, 11, 14, 22, 13, 20, 5000, tzinfo=dt.UTC)
    doc = json.loads(timeseries_document({"series_id": 7, "timestamp_ms": when, "values": [1, 2.5]}, fields))
    assert doc == {"series_id": "7", "timestamp_ms": 1_700_000_000_005, "values": [1, 2.5]}
    window = {"series_id": "s", "values": [{"v": [1.0, 2.0]}, {"v": [3.0, 4.0]}], "start_ms": 1, "end_ms": 2}
    assert json.loads(timeseries_document(window, fields)) == {
        "series_id": "s", "values": [[1.0, 2.0], [3.0, 4.0]], "start_ms": 1, "end_ms": 2,
    }  # fmt: skip
    assert timeseries_document({"series_id": "s", "values": [1.0]}, fields).reason == "missing_field"
    assert timeseries_document({"series_id": True, "values": [1.0], "timestamp_ms": 1}, fields).reason == (
        "wrong_field_type"
    )
    nan = json.loads(timeseries_document({"series_id": "s", "timestamp_ms": 1, "values": [float("nan")]}, fields))
    assert nan["values"] == [None]  # the modality names it non_finite, as for JSON input


# -- outages ------------------------------------------------------------------------------------------


class FlakyRegistry:
    """The mock registry behind a switch: while ``down``, every request that would reach the server fails as
    a refused connection; schemas already fetched are answered from the cache, as the real client does."""

    def __init__(self, client):
        self._client = client
        self.down = False
        self.requests = 0
        self._schemas = {}

    def get_schema(self, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in self._schemas:
            self._schemas[key] = self._request("get_schema", *args, **kwargs)
        return self._schemas[key]

    def _request(self, name, *args, **kwargs):
        self.requests += 1
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return getattr(self._client, name)(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        return (lambda *a, **k: self._request(name, *a, **k)) if callable(attr) else attr


@pytest.mark.parametrize("status", [None, 503, 401])
def test_a_registry_that_does_not_answer_is_an_outage_not_a_dead_letter(status):
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    client = registry()
    good = text_serializer("avro", client)("r", "x", 1)
    flaky = FlakyRegistry(registry())  # an empty registry: every schema id is a new one
    flaky.down = True
    if status is not None:
        flaky._client.get_schema = lambda *a, **k: (_ for _ in ()).throw(SchemaRegistryError(status, -1, "no"))
        flaky.down = False
    decoder = RecordDecoder(text_settings("avro").input, flaky)
    assert isinstance(decoder(good, TOPIC), RegistryDown)


def test_registry_outage_holds_the_partition_and_recovers_with_none_missing(ts_spec):
    client = registry()
    serialize = series_serializer("avro", client)
    points = series_points(n=16)
    # A new schema (a later version) halfway: its first record finds the registry down.
    later = json.loads(SERIES_AVRO)
    later["fields"].append({"name": "site", "type": "string", "default": "x"})
    serialize_later = AvroSerializer(client, json.dumps(later))
    records = []
    for i, (sid, at, v) in enumerate(points):
        if i < len(points) // 2:
            records.append((sid.encode(), serialize(sid, at, v)))
        else:
            records.append(
                (sid.encode(), serialize_later({"sensor": sid, "at": at, "channels": v, "site": "y"}, ctx()))
            )
    records.insert(5, (b"bad", b"\x01not framed"))

    flaky = FlakyRegistry(client)
    settings = ts_settings("avro")
    clock = [0.0]
    consumer = FakeConsumer({0: records}, topic=TOPIC)
    producer = FakeProducer(ack_immediately=True)
    backend = FakeBackend(ts_spec)
    modality = RecordInput(modality_for(ts_spec, settings), settings, RecordDecoder(settings.input, flaky))
    worker = Worker(settings, modality, backend, consumer, producer, clock=lambda: clock[0])
    consumer.subscribe([TOPIC], listener=None)
    worker.on_assigned(sorted(consumer.assignment()))

    worker.step()  # the first poll fetches the first schema; then the registry goes away
    assert flaky.requests == 1
    flaky.down = True
    for _ in range(60):  # until the later schema's first record is met with the registry down
        worker.step()
        if worker.status()["degraded"]:
            break
    assert worker.status()["degraded"] and "registry" in worker.status()["degraded_reason"]
    assert consumer.paused() == {TopicPartition(TOPIC, 0)}
    held_at = consumer.committed.get(TopicPartition(TOPIC, 0), 0)
    first_later = len(points) // 2 + 1  # the bad message was inserted before it
    assert 0 < held_at <= first_later, "the first schema's points went on; nothing from the held record on"

    for _ in range(5):  # still down: probes back off, nothing moves
        clock[0] += 10
        worker.step()
    assert worker.status()["degraded"]

    flaky.down = False
    for _ in range(200):
        clock[0] += 1
        worker.step()
        if consumer.drained() and not worker.status()["degraded"] and not worker.status()["in_flight"]:
            break
    worker.drain()
    assert not worker.status()["degraded"]
    rows = window_rows(producer)
    dead = producer.sent.get("deadletter.image", [])
    # Every point is in a published window or still in an open one; the one bad message is a dead letter.
    per_series = {sid: sum(1 for p in points if p[0] == sid) for sid in ("a", "b")}
    finished = sum(r["messages_finished"] for r in rows)
    assert finished == sum(n - (n - 4) % 2 - 2 for n in per_series.values())  # stride 2, window 4
    assert [dict(h)[REASON] for _, _, h in dead] == [b"not_registry_framed"]
    assert dead[0][1] == b"\x01not framed", "the dead letter is the message as consumed"
    assert worker.stats.outages >= 1


def test_dead_letters_of_rewritten_messages_carry_the_consumed_bytes(ts_spec):
    client = registry()
    serialize = series_serializer("avro", client)
    # Two points of one series out of order: the second is 'late', found by the modality on the rewritten message.
    records = [(b"a", serialize("a", 2_000, [1.0, 2.0, 3.0])), (b"a", serialize("a", 1_000, [1.0, 2.0, 3.0]))]
    settings = ts_settings("avro")
    worker, consumer, producer = ts_worker(ts_spec, settings, records, RecordDecoder(settings.input, client))
    run_worker(worker, consumer)
    (dead,) = producer.sent["deadletter.image"]
    key, value, headers = dead
    assert dict(headers)[REASON] == b"late"
    assert value == records[1][1] and key == b"a"
    assert ("content-type", b"application/json") not in headers


def test_unavailable_stops_the_partition_at_the_first_held_record():
    client = registry()
    good = text_serializer("avro", client)("r", "x", 1)
    flaky = FlakyRegistry(registry())
    flaky.down = True
    settings = text_settings("avro")

    class Inner:
        name, fields = "text", ()

        def decode_many(self, msgs):
            return list(msgs)

    wrapped = RecordInput(Inner(), settings, RecordDecoder(settings.input, flaky))
    msgs = [msg(b"\x01x", 0), msg(good, 1), msg(b"\x01y", 2), msg(b"\x01z", 0, partition=1)]
    out = wrapped.decode_many(msgs)
    assert isinstance(out[0], BadRecord) and out[0].reason == "not_registry_framed"
    assert isinstance(out[1], Unavailable) and isinstance(out[2], Unavailable), "held from the first on"
    assert isinstance(out[3], BadRecord), "other partitions go on"


def test_envelope_format_reads_every_message_as_the_envelope():
    import base64

    from embedstream.modalities.image import DecodedImage, ImageModality

    from .test_worker_loop import SPEC, png

    settings = load_settings(input={"format": "envelope"})
    wrapped = with_input_format(ImageModality(SPEC, settings), settings)
    assert isinstance(wrapped, RecordInput) and with_input_format(wrapped, settings) is wrapped
    envelope = orjson.dumps({"id": "cam-1", "image": base64.b64encode(png(9)).decode()})
    # A producer's content-type header would make the raw format read the envelope as image bytes.
    (out,) = wrapped.decode_many([msg(envelope, headers=[("content-type", b"image/png")])])
    assert isinstance(out, DecodedImage) and out.id == "cam-1"
    (bad,) = wrapped.decode_many([msg(png(9), headers=[("content-type", b"image/png")])])
    assert isinstance(bad, BadRecord) and bad.reason == "invalid_envelope"


def test_registry_auth_and_tls_reach_the_client_config_and_secrets_stay_out_of_dumps(tmp_path):
    from embedstream.config import dump_toml

    settings = load_settings(
        input={"format": "avro", "registry": {"url": "https://sr:8081", "username": "key", "password": "s3cret",
               "ssl_cafile": str(tmp_path / "ca.pem"), "timeout_s": 2}},
    )  # fmt: skip
    conf = registry_client_config(settings.input.registry)
    assert conf["basic.auth.user.info"] == "key:s3cret"
    assert conf["ssl.ca.location"].endswith("ca.pem") and conf["timeout"] == 2
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert "s3cret" in dump_toml(settings)  # a config file written for a child process keeps it
    bearer = load_settings(input={"format": "avro", "registry": {"url": "https://sr", "bearer_token": "tok"}})
    conf = registry_client_config(bearer.input.registry)
    assert conf["bearer.auth.token"] == "tok" and conf["bearer.auth.credentials.source"] == "STATIC"
    with pytest.raises(Exception, match=r"registry\.url"):
        load_settings(input={"format": "protobuf"})


def test_registry_errors_say_what_was_wrong():
    """A value too short for a frame, and a record whose schema is of another format than input.format."""
    client = registry()
    decoder = RecordDecoder(text_settings("avro").input, client)
    short = decoder(b"\x00\x00\x01", TOPIC)
    assert isinstance(short, Refused) and short.reason == "not_registry_framed"
    assert short.message.startswith("not a schema-registry record: 3 byte(s), fewer than the 5 of its frame")
    for fmt, kind in (("json_schema", "JSON"), ("protobuf", "PROTOBUF")):
        value = text_serializer(fmt, client)("r", "a sentence", 7)  # registered as a schema of that format
        out = decoder(value, TOPIC)
        assert isinstance(out, Refused) and out.reason == "undecodable_record", out
        assert f"is of type {kind}; input.format is avro (type AVRO)" in out.message, out.message
    avro = text_serializer("avro", client)("r", "a sentence", 7)
    out = RecordDecoder(text_settings("json_schema").input, client)(avro, TOPIC)
    assert isinstance(out, Refused) and "is of type AVRO; input.format is json_schema (type JSON)" in out.message
