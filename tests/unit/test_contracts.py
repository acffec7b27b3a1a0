"""The files under schemas/ are the published contracts; these tests hold the code to them."""

import base64
import json
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator

from embedstream import decode_embeddings
from embedstream.config import ImageLimits
from embedstream.consume import deadletter
from embedstream.modalities import MODALITIES, modality_fields
from embedstream.modalities import _envelope as envelope
from embedstream.modalities.image import read_input
from embedstream.records import REASONS, BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import (
    CONTENT_TYPE,
    SCHEMA_VERSION,
    BatchEncoder,
    RowMeta,
    encode_batch,
    output_schema,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
IMG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg").decode()


def load(name):
    return json.loads((SCHEMAS / name).read_text())


@pytest.fixture(scope="module")
def envelope_validator():
    schema = load("image-envelope.schema.json")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def source(value, key=b"k1", headers=()):
    return SourceMessage("images", 3, 42, key, value, 1_700_000_000_000, tuple(headers))


# -- the JSON envelope ------------------------------------------------------------------------------

ENVELOPES = {
    # accepted by envelope.unwrap()
    "valid_minimal": ({"image": IMG_B64}, True),
    "valid_full": (
        {"image": IMG_B64, "id": "img-1", "event_time_ms": 1_700_000_000_123, "metadata": {"camera": 7, "x": [1]}},
        True,
    ),
    "valid_padding_one": ({"image": "QUI="}, True),
    "valid_padding_two": ({"image": "QQ=="}, True),
    "valid_event_time_zero": ({"image": IMG_B64, "event_time_ms": 0}, True),
    "valid_event_time_int64_max": ({"image": IMG_B64, "event_time_ms": 2**63 - 1}, True),
    "valid_metadata_empty": ({"image": IMG_B64, "metadata": {}}, True),
    # rejected by envelope.unwrap()
    "missing_image": ({"id": "x"}, False),
    "image_empty": ({"image": ""}, False),
    "image_not_string": ({"image": 123}, False),
    "image_null": ({"image": None}, False),
    "bad_base64_alphabet": ({"image": "ab-_"}, False),
    "bad_base64_padding": ({"image": "QUI"}, False),
    "bad_base64_one_char_over": ({"image": "QUJDR"}, False),
    "bad_base64_excess_after_padding": ({"image": "QQ==QQ=="}, False),
    "bad_base64_whitespace": ({"image": "QUJD\nREVG"}, False),
    "bad_base64_only_padding": ({"image": "===="}, False),
    "extra_field": ({"image": IMG_B64, "label": "cat"}, False),
    "id_empty": ({"image": IMG_B64, "id": ""}, False),
    "id_not_string": ({"image": IMG_B64, "id": 5}, False),
    "id_null": ({"image": IMG_B64, "id": None}, False),
    "event_time_negative": ({"image": IMG_B64, "event_time_ms": -1}, False),
    "event_time_bool": ({"image": IMG_B64, "event_time_ms": True}, False),
    "event_time_string": ({"image": IMG_B64, "event_time_ms": "1700000000000"}, False),
    "event_time_fraction": ({"image": IMG_B64, "event_time_ms": 1.5}, False),
    "metadata_not_object": ({"image": IMG_B64, "metadata": [1, 2]}, False),
    "metadata_string": ({"image": IMG_B64, "metadata": "{}"}, False),
    "not_an_object": ([IMG_B64], False),
    # images by reference (modalities/image.py reads "uri")
    "valid_uri": ({"uri": "s3://bucket/key.jpg", "id": "ref-1"}, True),
    "valid_https_uri": ({"uri": "https://images.example.com/a/b.png", "event_time_ms": 5}, True),
    "uri_and_image": ({"uri": "s3://bucket/key.jpg", "image": IMG_B64}, False),
    "uri_empty": ({"uri": ""}, False),
    "uri_not_string": ({"uri": 7}, False),
}


def test_envelope_schema_is_a_valid_json_schema(envelope_validator):
    assert envelope_validator.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert envelope_validator.schema["additionalProperties"] is False
    assert set(envelope_validator.schema["properties"]) == set(envelope.ALLOWED_KEYS)
    assert envelope_validator.schema["oneOf"] == [{"required": ["image"]}, {"required": ["uri"]}]


@pytest.mark.parametrize("case", sorted(ENVELOPES))
def test_envelope_schema_agrees_with_unwrap(envelope_validator, case):
    doc, accepted = ENVELOPES[case]
    msg = source(orjson.dumps(doc), headers=[("content-type", b"application/json")])
    result = read_input(msg, ImageLimits())
    schema_ok = envelope_validator.is_valid(doc)
    if accepted:
        assert not isinstance(result, BadRecord), result
        assert schema_ok, list(envelope_validator.iter_errors(doc))
    else:
        assert isinstance(result, BadRecord)
        assert result.reason == "invalid_envelope"
        assert not schema_ok


def test_unwrap_defaults_the_id_to_the_key_and_the_time_to_the_timestamp():
    msg = source(orjson.dumps({"image": IMG_B64}), key=b"sensor-9")
    out = envelope.unwrap(msg)
    assert not isinstance(out, BadRecord)
    assert out.id == "sensor-9"
    assert out.event_time_ms == msg.timestamp_ms
    assert out.payload == base64.b64decode(IMG_B64)
    full = envelope.unwrap(source(orjson.dumps({"image": IMG_B64, "id": "own", "event_time_ms": 5})))
    assert (full.id, full.event_time_ms) == ("own", 5)


def test_event_time_beyond_int64_is_rejected_like_the_schema_says(envelope_validator):
    doc = {"image": IMG_B64, "event_time_ms": 2**63}
    assert not envelope_validator.is_valid(doc)
    assert isinstance(envelope.unwrap(source(orjson.dumps(doc))), BadRecord)


def test_integral_float_event_time_is_a_known_schema_gap(envelope_validator):
    # JSON Schema counts 1.0 as an integer; the worker (orjson -> float) rejects it. The schema says so in prose.
    doc = {"image": IMG_B64, "event_time_ms": 1000.0}
    assert envelope_validator.is_valid(doc)
    assert isinstance(envelope.unwrap(source(orjson.dumps(doc))), BadRecord)
    assert "1.0" in envelope_validator.schema["properties"]["event_time_ms"]["description"]


@pytest.mark.parametrize(
    ("value", "headers", "expected"),
    [
        (b'{"image": "QQ=="}', (), True),
        (b"\xff\xd8\xff\xe0", (), False),
        (b"\x89PNG\r\n", (), False),
        (b"RIFF....WEBP", (), False),
        (b"[]", (("content-type", b"application/json; charset=utf-8"),), True),
        (b"\xff\xd8\xff", (("Content-Type", b"Application/JSON"),), True),
        (b'{"image": "QQ=="}', (("content-type", b"image/jpeg"),), False),
    ],
)
def test_envelope_recognition(value, headers, expected):
    assert envelope.is_envelope(source(value, headers=headers)) is expected


# -- the Arrow output -------------------------------------------------------------------------------


def expected_fields(contract, modality, dim):
    fields = list(contract["fields"])
    extra = contract["modality_fields"].get(modality, [])
    at = [f["name"] for f in fields].index(contract["modality_fields"]["insert_before"])
    fields[at:at] = extra
    return [(f["name"], f["type"].replace("[dim]", f"[{dim}]"), f["nullable"]) for f in fields]


@pytest.mark.parametrize(
    ("modality", "dim"), [("image", 8), ("image", 768), ("text", 4), *((m, 16) for m in sorted(MODALITIES))]
)
def test_output_schema_matches_the_contract(modality, dim):
    contract = load("embedding.arrow.json")
    assert contract["schema_version"] == SCHEMA_VERSION
    schema = output_schema(modality, "m", "1", dim)
    actual = [(f.name, str(f.type), f.nullable) for f in schema]
    assert actual == expected_fields(contract, modality, dim)
    assert schema.field("embedding").type.list_size == dim
    assert schema.field("embedding").type.value_type == pa.float32()

    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert list(meta) == [m["key"] for m in contract["metadata"]]
    assert meta == {
        "embedstream.schema_version": SCHEMA_VERSION,
        "embedstream.modality": modality,
        "embedstream.model_name": "m",
        "embedstream.model_version": "1",
        "embedstream.embedding_dim": str(dim),
        "embedstream.weights_sha256": "unknown",
        "embedstream.preprocessing_sha256": "unknown",
    }


@pytest.mark.parametrize(
    ("modality", "overrides", "names"),
    [
        ("image", {}, []),
        ("image", {"fetch": {"enabled": True}}, ["source_uri"]),
        ("text", {"fetch": {"enabled": True}}, []),
        ("image", {"fetch": {"enabled": True}, "input": {"format": "avro", "registry": {"url": "mock://c"}}},
         ["source_uri", "schema_id"]),
        ("timeseries", {"input": {"format": "protobuf", "registry": {"url": "mock://c"}}}, ["schema_id"]),
    ],
)  # fmt: skip
def test_input_columns_follow_the_contract_and_appear_only_for_such_input(modality, overrides, names):
    from embedstream.config import load_settings
    from embedstream.formats import input_fields

    contract = {c["name"]: c for c in load("embedding.arrow.json")["input_fields"]["columns"]}
    fields = input_fields(load_settings(**overrides), modality)
    assert [f.name for f in fields] == names
    assert [(f.name, str(f.type), f.nullable) for f in fields] == [
        (n, contract[n]["type"], contract[n]["nullable"]) for n in names
    ]
    model = [pa.field("anomaly", pa.bool_(), nullable=False)]
    schema = output_schema(modality, "m", "1", 4, model, input_fields=fields)
    modality_names = [f.name for f in modality_fields(modality)]
    order = [f.name for f in schema]
    assert order[-2 - len(names) : -2] == names, "after the modality's columns, before the model's"
    assert order[len(order) - 3 - len(names) - len(modality_names) + 1 :][: len(modality_names)] == modality_names
    rows, emb = rows_and_embeddings(2, 4)
    extra = {"source_width": 1, "source_height": 1, "truncated": False, "token_count": 1, "series_id": "s",
             "window_start": 0, "window_end": 0, "points": 1, "messages_finished": 1}  # fmt: skip
    extra["schema_id"] = 7
    rows = [RowMeta(r.key, r.id, r.topic, r.partition, r.offset, r.timestamp_ms, extra) for r in rows]
    table = decode_embeddings(encode_batch(schema, rows, emb, {"anomaly": np.zeros(2, bool)}))
    for name in names:
        assert table.column(name).to_pylist() == ([7, 7] if name == "schema_id" else [None, None])


def test_output_schema_names_the_fingerprints_it_is_given():
    schema = output_schema("text", "m", "1", 4, weights_sha256="0123456789abcdef", preprocessing_sha256="fedcba98")
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["embedstream.weights_sha256"] == "0123456789abcdef"
    assert meta["embedstream.preprocessing_sha256"] == "fedcba98"


def test_output_message_headers_match_the_contract():
    headers = {h["name"]: h["value"] for h in load("embedding.arrow.json")["message"]["headers"]}
    assert headers["content-type"] == CONTENT_TYPE
    assert headers["embedstream.schema_version"] == SCHEMA_VERSION
    assert set(headers) == {
        "content-type",
        "embedstream.schema_version",
        "embedstream.model",
        "embedstream.weights_sha256",
        "embedstream.preprocessing_sha256",
        "embedstream.rows",
    }


def rows_and_embeddings(n, dim=8):
    rows = [
        RowMeta(
            key=None if i % 2 else f"k{i}".encode(),
            id=f"id-{i}",
            topic="images",
            partition=3,
            offset=100 + i,
            timestamp_ms=1_700_000_000_000 + i,
            extra={"source_width": 640 + i, "source_height": 480 - i},
        )
        for i in range(n)
    ]
    emb = np.arange(n * dim, dtype=np.float32).reshape(n, dim) / 7
    return rows, emb


def test_encode_decode_round_trip_keeps_values_and_embeddings():
    schema = output_schema("image", "clip", "2", 8)
    rows, emb = rows_and_embeddings(5)
    table = decode_embeddings(encode_batch(schema, rows, emb))
    assert table.schema.equals(schema, check_metadata=True)
    assert table.num_rows == 5
    assert table.column("key").to_pylist() == [r.key for r in rows]
    assert table.column("id").to_pylist() == [r.id for r in rows]
    assert table.column("source_topic").to_pylist() == ["images"] * 5
    assert table.column("source_partition").to_pylist() == [3] * 5
    assert table.column("source_offset").to_pylist() == [r.offset for r in rows]
    assert table.column("event_time").cast(pa.int64()).to_pylist() == [r.timestamp_ms for r in rows]
    assert table.column("model_name").to_pylist() == ["clip"] * 5
    assert table.column("model_version").to_pylist() == ["2"] * 5
    assert table.column("source_width").to_pylist() == [r.extra["source_width"] for r in rows]
    assert table.column("source_height").to_pylist() == [r.extra["source_height"] for r in rows]
    col = table.column("embedding").combine_chunks()
    np.testing.assert_array_equal(col.values.to_numpy().reshape(-1, col.type.list_size), emb)


def test_value_is_a_plain_arrow_ipc_stream():
    schema = output_schema("image", "clip", "2", 8)
    rows, emb = rows_and_embeddings(2)
    table = pa.ipc.open_stream(encode_batch(schema, rows, emb)).read_all()
    assert table.schema.metadata[b"embedstream.schema_version"] == SCHEMA_VERSION.encode()
    assert table.num_rows == 2


def test_one_encoder_reused_writes_what_the_ipc_stream_writer_writes():
    schema = output_schema("image", "clip", "2", 8)
    encoder = BatchEncoder(schema)
    for n in (3, 1, 0):
        rows, emb = rows_and_embeddings(n)
        value = encoder.encode(rows, emb)
        batch = pa.ipc.open_stream(value).read_next_batch()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(batch)
        assert value == sink.getvalue().to_pybytes()


def test_slices_of_one_batch_decode_as_each_part_encoded_alone():
    """Per-partition messages cut from one batch: validity bitmaps and string offsets at odd starts."""
    schema = output_schema("image", "clip", "2", 8)
    encoder = BatchEncoder(schema)
    rows, emb = rows_and_embeddings(9)
    slices = [(0, 3), (3, 1), (4, 5)]
    values = encoder.encode_slices(rows, emb, None, slices)
    alone = [encoder.encode(rows[a : a + n], emb[a : a + n]) for a, n in slices]
    for value, expected in zip(values, alone, strict=True):
        assert decode_embeddings(value).equals(decode_embeddings(expected), check_metadata=True)
    assert [decode_embeddings(v).column("source_offset").to_pylist() for v in values] == [
        [100, 101, 102],
        [103],
        [104, 105, 106, 107, 108],
    ]


def test_zero_rows_round_trip():
    schema = output_schema("image", "clip", "2", 8)
    table = decode_embeddings(encode_batch(schema, [], np.zeros((0, 8), np.float32)))
    assert table.num_rows == 0
    assert table.schema.equals(schema, check_metadata=True)


def test_encode_rejects_a_mismatched_embedding_shape():
    schema = output_schema("image", "clip", "2", 8)
    rows, _ = rows_and_embeddings(2)
    with pytest.raises(ValueError, match="does not match"):
        encode_batch(schema, rows, np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        encode_batch(schema, rows, np.zeros((3, 8), np.float32))


@pytest.mark.parametrize("version", ["2", None])
def test_decode_rejects_other_schema_versions(version):
    schema = output_schema("image", "clip", "2", 8)
    rows, emb = rows_and_embeddings(1)
    meta = dict(schema.metadata)
    if version is None:
        del meta[b"embedstream.schema_version"]
    else:
        meta[b"embedstream.schema_version"] = version.encode()
    value = encode_batch(schema.with_metadata(meta), rows, emb)
    with pytest.raises(ValueError, match="unsupported embedstream schema version"):
        decode_embeddings(value)


# -- dead letters -----------------------------------------------------------------------------------


def test_dead_letter_reasons_match_the_code():
    contract = load("dead-letter.json")
    assert [r["reason"] for r in contract["reasons"]] == list(REASONS)
    assert all(r["description"] for r in contract["reasons"])


def test_dead_letter_header_names_match_the_code():
    contract = load("dead-letter.json")
    constants = [v for k, v in vars(deadletter).items() if k.isupper() and k != "HEADER_PREFIX" and isinstance(v, str)]
    names = [h["name"] for h in contract["headers"]]
    optional = [h["name"] for h in contract["optional_headers"]]
    assert set(names) | set(optional) == set(constants)
    assert contract["header_prefix"] == deadletter.HEADER_PREFIX
    assert contract["max_message_chars"] == deadletter.MAX_MESSAGE_CHARS
    msg = source(b"x")
    produced = [k for k, _ in deadletter.dead_letter_headers(BadRecord(msg, "empty", "m"), "w")]
    assert produced == names


def test_dead_letter_headers_keep_originals_after_ours_and_truncate():
    original = (("content-type", b"image/jpeg"), ("trace", b"abc"), ("embedstream.dlq.reason", b"old"))
    msg = source(b"\xff\xd8", key=b"k", headers=original)
    bad = BadRecord(msg, "undecodable", "é" * 2000, "UnidentifiedImageError")
    headers = deadletter.dead_letter_headers(bad, "worker-7")
    ours, theirs = headers[:7], headers[7:]
    assert theirs == [("content-type", b"image/jpeg"), ("trace", b"abc")]
    got = dict(ours)
    assert got[deadletter.REASON] == b"undecodable"
    assert got[deadletter.ERROR_CLASS] == b"UnidentifiedImageError"
    assert got[deadletter.MESSAGE].decode() == "é" * deadletter.MAX_MESSAGE_CHARS
    assert got[deadletter.SOURCE_TOPIC] == b"images"
    assert got[deadletter.SOURCE_PARTITION] == b"3"
    assert got[deadletter.SOURCE_OFFSET] == b"42"
    assert got[deadletter.WORKER_ID] == b"worker-7"
    assert all(isinstance(v, bytes) for _, v in headers)
