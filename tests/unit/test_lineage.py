"""Lineage: the exported spec names the weights and preprocessing it serves, and outputs carry both."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format, text_format
from safetensors.torch import save_file
from tritonclient.grpc import model_config_pb2

from embedstream.config import EncoderSettings, load_settings
from embedstream.consume.offsets import OffsetTracker
from embedstream.encoders import EncoderSpec, Sidecar, get_family, packaged_model_dir
from embedstream.encoders.autoencoder import WindowAutoencoder
from embedstream.export import export_model
from embedstream.lineage import (
    PATTERN,
    preprocessing_fingerprint,
    weights_fingerprint,
)
from embedstream.modalities.image import ImageModality
from embedstream.records import SourceMessage
from embedstream.sinks.kafka import KafkaSink
from embedstream.testing import FakeProducer

from .test_worker_loop import png

SMALL_CNN = EncoderSettings(family="cnn", arch="mobilenetv3_small_050", weights="random", max_batch_size=8)


def exported(settings: EncoderSettings, repo: Path) -> EncoderSpec:
    spec = export_model(settings, repo)
    assert PATTERN.match(spec.weights_sha256 or "") and PATTERN.match(spec.preprocessing_sha256 or "")
    # What the repository hands Triton says the same as what export returned.
    assert EncoderSpec.from_json((repo / spec.name / "spec.json").read_bytes()) == spec
    return spec


def served_weights(spec: EncoderSpec, repo: Path) -> str:
    """The fingerprint recomputed from the model file Triton loads."""
    return weights_fingerprint(torch.jit.load(str(repo / spec.name / "1" / "model.pt")).state_dict())


# -- weights -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(7)
    ckpt = tmp_path_factory.mktemp("ckpt") / "w.safetensors"
    save_file(timm.create_model("mobilenetv3_small_050", num_classes=0).state_dict(), str(ckpt))
    return ckpt


@pytest.mark.slow
def test_the_same_checkpoint_always_exports_the_same_weights_fingerprint(cnn_checkpoint, tmp_path):
    settings = SMALL_CNN.model_copy(update={"weights": str(cnn_checkpoint)})
    first = exported(settings, tmp_path / "a")
    second = exported(settings.model_copy(update={"version": "2", "model_name": "renamed"}), tmp_path / "b")
    # Another label on the same weights: the fingerprints say it is the same model.
    assert (first.weights_sha256, first.preprocessing_sha256) == (second.weights_sha256, second.preprocessing_sha256)
    assert served_weights(first, tmp_path / "a") == first.weights_sha256


@pytest.mark.slow
def test_a_perturbed_tensor_or_another_seed_changes_the_weights_fingerprint(cnn_checkpoint, tmp_path):
    from safetensors.torch import load_file

    base = exported(SMALL_CNN.model_copy(update={"weights": str(cnn_checkpoint)}), tmp_path / "base")
    state = load_file(str(cnn_checkpoint))
    name = sorted(state)[len(state) // 2]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    perturbed = tmp_path / "perturbed.safetensors"
    save_file(state, str(perturbed))
    other = exported(SMALL_CNN.model_copy(update={"weights": str(perturbed)}), tmp_path / "p")
    assert other.weights_sha256 != base.weights_sha256
    assert other.preprocessing_sha256 == base.preprocessing_sha256

    seeded = [
        exported(SMALL_CNN.model_copy(update={"seed": s}), tmp_path / f"s{s}-{i}") for i, s in enumerate((1, 1, 2))
    ]
    assert seeded[0].weights_sha256 == seeded[1].weights_sha256 != seeded[2].weights_sha256


@pytest.mark.slow
def test_packaged_weights_are_fingerprinted_and_differ_from_random(tmp_path):
    lite = EncoderSettings(family="cnn", arch="tf_efficientnet_lite0", max_batch_size=8)
    packaged = exported(lite, tmp_path / "packaged")
    random_init = exported(lite.model_copy(update={"weights": "random"}), tmp_path / "random")
    assert packaged.weights_sha256 != random_init.weights_sha256
    assert packaged.preprocessing_sha256 == random_init.preprocessing_sha256
    text = exported(EncoderSettings(family="transformer", arch="all-MiniLM-L6-v2", max_batch_size=8), tmp_path / "t")
    assert served_weights(text, tmp_path / "t") == text.weights_sha256


def test_fingerprints_cover_every_dtype_and_shape():
    a = {"x": torch.zeros(2, 3), "flag": torch.tensor([True]), "h": torch.ones(4, dtype=torch.bfloat16)}
    assert weights_fingerprint(a) == weights_fingerprint(dict(reversed(a.items())))
    assert weights_fingerprint(a) != weights_fingerprint({**a, "x": torch.zeros(3, 2)})
    assert weights_fingerprint(a) != weights_fingerprint({**a, "x": torch.zeros(2, 3, dtype=torch.float64)})
    assert weights_fingerprint(a) != weights_fingerprint({**a, "renamed": a["x"]})


def autoencoder_artifact(directory: Path, threshold: float, mean: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    means, stds = (mean, 0.0, 0.0), (1.0, 2.0, 3.0)
    module = WindowAutoencoder(16, 3, 16, 4, means, stds, threshold)
    weights = directory / "ae.safetensors"
    save_file(module.state_dict(), str(weights))
    Sidecar("autoencoder", 16, 3, 16, latent=4, mean=means, std=stds, threshold=threshold).write(directory / "ae.json")
    return weights


@pytest.mark.slow
def test_time_series_normalisation_and_threshold_are_part_of_the_fingerprints(tmp_path):
    def spec_of(name: str, threshold: float, mean: float) -> EncoderSpec:
        weights = autoencoder_artifact(tmp_path / name, threshold, mean)
        return exported(EncoderSettings(family="autoencoder", weights=str(weights), max_batch_size=8), tmp_path / name)

    base = spec_of("base", 0.5, 0.0)
    # The threshold is a buffer of the served module: same preprocessing, other weights.
    threshold = spec_of("threshold", 0.7, 0.0)
    assert threshold.weights_sha256 != base.weights_sha256
    assert threshold.preprocessing_sha256 == base.preprocessing_sha256
    # Normalisation is both: a buffer of the module and the scale the raw values are read on.
    shifted = spec_of("mean", 0.5, 1.0)
    assert shifted.weights_sha256 != base.weights_sha256
    assert shifted.preprocessing_sha256 != base.preprocessing_sha256
    assert base.extra["mean"] == [0.0, 0.0, 0.0] and base.extra["std"] == [1.0, 2.0, 3.0]


# -- preprocessing -------------------------------------------------------------------------------------------


def test_image_preprocessing_fingerprint_follows_size_interpolation_and_normalisation():
    spec = get_family("cnn").describe(SMALL_CNN)
    assert spec.preprocessing is not None
    base = preprocessing_fingerprint(spec)
    assert base == preprocessing_fingerprint(dataclasses.replace(spec, version="9", name="other"))
    for change in (
        {"interpolation": "bilinear" if spec.preprocessing.interpolation != "bilinear" else "bicubic"},
        {"resize_shorter_to": spec.preprocessing.resize_shorter_to + 1},
        {"mean": (0.5, 0.5, 0.5)},
        {"height": spec.preprocessing.height - 1},
    ):
        changed = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, **change))
        assert preprocessing_fingerprint(changed) != base, change


def test_text_preprocessing_fingerprint_follows_the_tokenizer_file_and_max_length(tmp_path):
    copy = tmp_path / "minilm"
    shutil.copytree(packaged_model_dir(), copy)
    settings = EncoderSettings(family="transformer", arch=str(copy))
    spec = get_family("transformer").describe(settings)
    assert len(spec.extra["tokenizer_sha256"]) == 64
    base = preprocessing_fingerprint(spec)
    assert base != preprocessing_fingerprint(dataclasses.replace(spec, extra={**spec.extra, "max_length": 128 + 1}))

    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["embedstreamnewtoken"] = len(tokenizer["model"]["vocab"])
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    changed = get_family("transformer").describe(settings.model_copy(update={"arch": str(other)}))
    assert changed.extra["tokenizer_sha256"] != spec.extra["tokenizer_sha256"]
    assert preprocessing_fingerprint(changed) != base


# -- outputs -----------------------------------------------------------------------------------------------


def test_every_output_message_and_schema_carry_the_served_fingerprints(tmp_path):
    spec = exported(SMALL_CNN, tmp_path)
    settings = load_settings(encoder=SMALL_CNN.model_dump(), batch={"max_size": 8}, worker_id="w")
    producer = FakeProducer(ack_immediately=True)
    sink = KafkaSink(settings, ImageModality(spec, settings), spec, producer, OffsetTracker())
    meta = {k.decode(): v.decode() for k, v in (sink.schema.metadata or {}).items()}
    assert meta["embedstream.weights_sha256"] == spec.weights_sha256
    assert meta["embedstream.preprocessing_sha256"] == spec.preprocessing_sha256
    modality = ImageModality(spec, settings)
    items = [modality.decode(SourceMessage("images", p, 0, None, png(40 * p), 1)) for p in (0, 1)]
    sink.publish(items, {spec.embedding_output.name: np.zeros((2, spec.embedding_dim), np.float32)})
    sent = producer.sent[settings.kafka.output_topic]
    assert len(sent) == 2
    for _, _, headers in sent:
        got = dict(headers)
        assert got["embedstream.weights_sha256"] == spec.weights_sha256.encode()
        assert got["embedstream.preprocessing_sha256"] == spec.preprocessing_sha256.encode()


def test_an_older_spec_without_fingerprints_reads_and_says_unknown(tmp_path):
    spec = get_family("cnn").describe(SMALL_CNN)
    old = json.loads(spec.to_json())
    del old["weights_sha256"], old["preprocessing_sha256"]
    read = EncoderSpec.from_json(json.dumps(old))
    assert read.weights_sha256 is None and read.preprocessing_sha256 is None
    settings = load_settings(encoder=SMALL_CNN.model_dump(), batch={"max_size": 8})
    sink = KafkaSink(settings, ImageModality(read, settings), read, FakeProducer(), OffsetTracker())
    assert (sink.schema.metadata or {})[b"embedstream.weights_sha256"] == b"unknown"


# -- the server's own check ------------------------------------------------------------------------------------


def python_backend_model():
    """The model.py Triton's Python backend runs, with the backend's real utilities module on the path."""
    import pytriton

    utils_dir = Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python"
    sys.path.insert(0, str(utils_dir))
    try:
        from embedstream.export import triton_python_model
    finally:
        sys.path.remove(str(utils_dir))
    return triton_python_model


def initialize_args(spec: EncoderSpec, repo: Path) -> dict:
    """What Triton hands the Python backend's initialize(): the config.pbtxt export wrote, as JSON."""
    parsed = text_format.Parse((repo / spec.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config = json.loads(json_format.MessageToJson(parsed, preserving_proto_field_name=True))
    return {
        "model_config": json.dumps(config),
        "model_instance_kind": "CPU",
        "model_repository": str(repo / spec.name),
        "model_version": "1",
    }


@pytest.mark.slow
def test_the_server_refuses_a_model_file_swapped_after_export(tmp_path):
    model = python_backend_model()
    spec = exported(SMALL_CNN, tmp_path / "a")
    model.TritonPythonModel().initialize(initialize_args(spec, tmp_path / "a"))  # its own file: served

    other = exported(SMALL_CNN.model_copy(update={"seed": 5}), tmp_path / "b")
    shutil.copy(tmp_path / "b" / other.name / "1" / "model.pt", tmp_path / "a" / spec.name / "1" / "model.pt")
    with pytest.raises(RuntimeError, match=rf"fingerprint {other.weights_sha256}.*says {spec.weights_sha256}"):
        model.TritonPythonModel().initialize(initialize_args(spec, tmp_path / "a"))
