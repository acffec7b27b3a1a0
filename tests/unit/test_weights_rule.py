"""Unset weights mean packaged ones where an encoder has them; random only where it has none."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from embedstream import cli
from embedstream.config import EncoderSettings
from embedstream.encoders._packaged import has_packaged_weights

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "config"


@pytest.mark.parametrize(
    ("family", "arch", "packaged"),
    [
        ("transformer", "all-MiniLM-L6-v2", True),
        ("transformer", "sentence-transformers/all-MiniLM-L6-v2", True),
        ("transformer", "some-org/some-hub-model", False),
        ("cnn", "tf_efficientnet_lite0", True),
        ("cnn", "tf_efficientnet_lite2", True),
        ("cnn", "mobilenetv3_small_100", False),
        ("autoencoder", "w32c3h16l8", False),
    ],
)
def test_which_encoders_have_packaged_weights(family, arch, packaged):
    assert has_packaged_weights(EncoderSettings(family=family, arch=arch)) is packaged


def test_the_local_stack_serves_the_packaged_text_model_not_a_random_one(caplog):
    with caplog.at_level(logging.WARNING, logger="embedstream"):
        settings = cli._local_settings(str(CONFIGS / "worker.text.toml"))
    assert settings.encoder.family == "transformer" and settings.encoder.weights is None
    assert "random" not in caplog.text


def test_the_local_stack_says_so_when_it_falls_back_to_random_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="embedstream"):
        settings = cli._local_settings(None)  # the default CNN has nothing packaged
    assert settings.encoder.weights == "random"
    assert "random weights" in caplog.text
