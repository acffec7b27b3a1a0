"""The worker's spec comes from the served model: its name computed torch-free, the rest read from Triton."""

import dataclasses
import json
import shutil
import types

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from embedstream.config import EncoderSettings, TritonSettings, load_settings
from embedstream.encoders import EncoderSpec, describe, get_family, packaged_model_dir, served_model_name
from embedstream.errors import ConfigError, ModelMismatchError
from embedstream.export import ExportTarget, render_config
from embedstream.inference import triton
from embedstream.inference.triton import SPEC_PARAMETER, TritonBackend

GRPC = TritonSettings(url="127.0.0.1:1", protocol="grpc", shared_memory="off")
IMAGE = EncoderSettings(family="cnn", arch="mobilenetv3_small_050", weights="random", max_batch_size=16)


def served_config(spec: EncoderSpec) -> dict:
    """A model config as Triton's gRPC client returns it (as_json=True) for what ``render_config`` wrote."""
    parsed = text_format.Parse(render_config(spec, ExportTarget()), model_config_pb2.ModelConfig())
    return json.loads(json_format.MessageToJson(parsed, preserving_proto_field_name=True))


class FakeClient:
    def __init__(self, configs: dict[str, dict], ready_after: int = 0) -> None:
        self.configs, self.ready_after, self.closed = configs, ready_after, False

    def is_model_ready(self, name: str) -> bool:
        if self.ready_after > 0:
            self.ready_after -= 1
            raise ConnectionRefusedError("not up yet")
        return name in self.configs

    def get_model_config(self, name: str, as_json: bool = False) -> dict:
        assert as_json
        return {"config": self.configs[name]}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def serve(monkeypatch):
    """Make the gRPC client module a fake whose every client serves ``configs``."""
    clients: list[FakeClient] = []

    def install(configs: dict[str, dict], ready_after: int = 0) -> list[FakeClient]:
        def client(url, **kwargs):
            clients.append(FakeClient(configs, ready_after))
            return clients[-1]

        fake = types.SimpleNamespace(InferenceServerClient=client)
        monkeypatch.setattr(triton, "_client_module", lambda protocol: fake)
        return clients

    return install


@pytest.fixture(scope="module")
def image_spec() -> EncoderSpec:
    return get_family("cnn").describe(IMAGE)


def test_the_backend_takes_the_spec_from_the_served_config(serve, image_spec):
    clients = serve({image_spec.name: served_config(image_spec)}, ready_after=2)
    backend = TritonBackend.for_served_model(GRPC, "image-mobilenetv3_small_050", 5, sleep=lambda s: None)
    assert backend.spec == image_spec
    backend.verify(16, IMAGE)
    # The client that waited for the model is the thread's client from then on.
    assert len(clients) == 1 and backend.served_spec() == image_spec
    backend.close()
    assert clients[0].closed


def test_a_model_without_the_spec_parameter_is_refused_with_the_fix(serve, image_spec):
    config = served_config(image_spec)
    del config["parameters"][SPEC_PARAMETER]
    clients = serve({image_spec.name: config})
    with pytest.raises(ModelMismatchError, match=r"no 'embedstream\.spec' parameter.*embedstream export-models"):
        TritonBackend.for_served_model(GRPC, image_spec.name, 5)
    assert clients[0].closed


def test_a_spec_of_another_model_or_garbage_is_refused(serve, image_spec):
    config = served_config(image_spec)
    garbage = json.loads(json.dumps(config))
    garbage["parameters"][SPEC_PARAMETER]["string_value"] = '{"name": "x"}'
    serve({"renamed": config, "garbage": garbage})
    with pytest.raises(ModelMismatchError, match="carries the spec of 'image-mobilenetv3_small_050'"):
        TritonBackend.for_served_model(GRPC, "renamed", 5)
    with pytest.raises(ModelMismatchError, match="no encoder spec"):
        TritonBackend.for_served_model(GRPC, "garbage", 5)


def test_verify_holds_the_served_spec_to_the_worker_settings(serve, image_spec):
    serve({image_spec.name: served_config(image_spec)})
    backend = TritonBackend.for_served_model(GRPC, image_spec.name, 5)
    with pytest.raises(ModelMismatchError, match=r"version '1' is served, encoder\.version is '2'"):
        backend.verify(16, IMAGE.model_copy(update={"version": "2"}))
    with pytest.raises(ModelMismatchError, match=r"family 'cnn' is served, encoder\.family is 'transformer'"):
        backend.verify(16, IMAGE.model_copy(update={"family": "transformer"}))
    with pytest.raises(ModelMismatchError, match="max_batch_size 16 < worker batch size 32"):
        backend.verify(32, IMAGE)


# -- lineage ----------------------------------------------------------------------------------------------

WEIGHTS, PREP = "0123456789abcdef", "fedcba9876543210"


@pytest.fixture
def fingerprinted(image_spec) -> EncoderSpec:
    return dataclasses.replace(image_spec, weights_sha256=WEIGHTS, preprocessing_sha256=PREP)


def test_no_pin_accepts_the_served_fingerprints_and_logs_them(serve, fingerprinted, caplog):
    serve({fingerprinted.name: served_config(fingerprinted)})
    backend = TritonBackend.for_served_model(GRPC, fingerprinted.name, 5)
    assert (backend.spec.weights_sha256, backend.spec.preprocessing_sha256) == (WEIGHTS, PREP)
    with caplog.at_level("INFO", logger="embedstream.inference.triton"):
        backend.verify(16, IMAGE)
    assert f"weights {WEIGHTS}, preprocessing {PREP}" in caplog.text


def test_pins_that_match_start_and_pins_that_differ_name_both_values(serve, fingerprinted):
    serve({fingerprinted.name: served_config(fingerprinted)})
    backend = TritonBackend.for_served_model(GRPC, fingerprinted.name, 5)
    backend.verify(16, IMAGE.model_copy(update={"weights_fingerprint": WEIGHTS, "preprocessing_fingerprint": PREP}))
    validated = "aaaaaaaaaaaaaaaa"
    with pytest.raises(
        ModelMismatchError,
        match=rf"weights fingerprint '{WEIGHTS}' is served, encoder\.weights_fingerprint pins '{validated}'",
    ):
        backend.verify(16, IMAGE.model_copy(update={"weights_fingerprint": validated}))
    with pytest.raises(
        ModelMismatchError,
        match=rf"preprocessing fingerprint '{PREP}' is served, encoder\.preprocessing_fingerprint pins '{validated}'",
    ):
        backend.verify(16, IMAGE.model_copy(update={"preprocessing_fingerprint": validated}))


def test_a_model_exported_before_fingerprints_is_accepted_with_a_warning_unless_pinned(serve, image_spec, caplog):
    serve({image_spec.name: served_config(image_spec)})
    backend = TritonBackend.for_served_model(GRPC, image_spec.name, 5)
    with caplog.at_level("WARNING", logger="embedstream.inference.triton"):
        backend.verify(16, IMAGE)
    assert "carries no weights/preprocessing fingerprints" in caplog.text and "export-models" in caplog.text
    with pytest.raises(ModelMismatchError, match=r"'unknown' is served.*exported before fingerprints: re-export"):
        backend.verify(16, IMAGE.model_copy(update={"weights_fingerprint": WEIGHTS}))


def test_a_pin_must_look_like_a_fingerprint():
    with pytest.raises(ConfigError, match=r"encoder\.weights_fingerprint"):
        load_settings(encoder={"weights_fingerprint": "v1-validated"})


def test_the_worker_refuses_a_tokenizer_other_than_the_exported_one(serve, tmp_path):
    copy = tmp_path / "minilm"
    shutil.copytree(packaged_model_dir(), copy)
    text = EncoderSettings(family="transformer", arch=str(copy), max_batch_size=16)
    spec = get_family("transformer").describe(text)
    serve({spec.name: served_config(spec)})
    backend = TritonBackend.for_served_model(GRPC, spec.name, 5)
    backend.verify(16, text)
    # The worker's tokenizer.json is edited after export: its token ids no longer match what was validated.
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"[UNK]"', '"[unk]"', 1))
    with pytest.raises(ModelMismatchError, match=r"tokenizer .*tokenizer\.json has sha256 [0-9a-f]{16}, the model was"):
        backend.verify(16, text)


def test_a_model_that_never_gets_ready_times_out(serve, image_spec):
    serve({})
    with pytest.raises(Exception, match="not ready"):
        TritonBackend.for_served_model(GRPC, image_spec.name, 0, sleep=lambda s: None)


# -- names ------------------------------------------------------------------------------------------------


def test_an_explicit_model_name_wins_for_every_family():
    for family in ("cnn", "transformer", "lstm", "autoencoder", "null"):
        assert served_model_name(EncoderSettings(family=family, arch="anything", model_name="m")) == "m"


def test_names_of_time_series_and_null_models_follow_their_rules():
    ts = EncoderSettings(family="autoencoder", arch="w16c3h16l4", weights="random")
    assert served_model_name(ts) == "ts-autoencoder-w16c3"
    null = ts.model_copy(update={"family": "null", "arch": "autoencoder/w16c3h16l4"})
    assert served_model_name(null) == "null-ts-autoencoder-w16c3"
    assert served_model_name(EncoderSettings(family="transformer", arch="org/My Model!")) == "text-My-Model"
    with pytest.raises(ConfigError, match="unknown encoder family 'nosuch'"):
        served_model_name(null.model_copy(update={"arch": "nosuch/x"}))
    with pytest.raises(ConfigError, match=r"encoder\.weights is not set"):
        served_model_name(EncoderSettings(family="lstm"))


def test_a_family_registered_from_outside_is_named_by_its_describe(image_spec):
    from embedstream.encoders import EncoderFamily, register_family
    from embedstream.encoders._registry import _FAMILIES

    def describe_outsider(settings):
        return dataclasses.replace(image_spec, name=f"outside-{settings.arch}")

    register_family(EncoderFamily("outsider", describe_outsider, build=None, example_inputs=None))
    try:
        assert served_model_name(EncoderSettings(family="outsider", arch="a")) == "outside-a"
    finally:
        del _FAMILIES["outsider"]


def test_describe_is_the_family_spec():
    settings = load_settings(encoder=IMAGE.model_dump(), batch={"max_size": 16})
    assert describe(settings) == get_family("cnn").describe(IMAGE)
