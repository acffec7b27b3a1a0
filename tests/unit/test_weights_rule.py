"""Unset weights mean packaged ones where an encoder has them; random only where it has none."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from embedstream import cli
from embedstream.config import EncoderSettings
from embedstream.encoders._packaged import has_packaged_weights
from embedstream.errors import ConfigError

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


def test_the_default_image_encoder_serves_packaged_imagenet_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="embedstream"):
        settings = cli._local_settings(None)
    assert (settings.encoder.arch, settings.encoder.weights) == ("tf_efficientnet_lite0", None)
    assert has_packaged_weights(settings.encoder)
    assert "random" not in caplog.text


@pytest.mark.parametrize(
    ("family", "arch", "hub"),
    [("cnn", "mobilenetv3_small_100", True), ("transformer", "some-org/some-hub-model", True)],
)
def test_unset_weights_without_packaged_ones_refuse_to_start_naming_the_choices(tmp_path, family, arch, hub):
    config = tmp_path / "worker.toml"
    config.write_text(f'[encoder]\nfamily = "{family}"\narch = "{arch}"\n')
    with pytest.raises(ConfigError) as err:
        cli._local_settings(str(config))
    message = str(err.value)
    assert "checkpoint path" in message and "'random'" in message
    assert ("'pretrained'" in message) is hub


def test_random_weights_only_when_named(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text('[encoder]\narch = "mobilenetv3_small_100"\nweights = "random"\n')
    assert cli._local_settings(str(config)).encoder.weights == "random"


def test_the_cli_exits_with_the_error_before_starting_anything(tmp_path, caplog):
    config = tmp_path / "worker.toml"
    config.write_text('[encoder]\narch = "mobilenetv3_small_100"\n')
    with caplog.at_level(logging.ERROR, logger="embedstream"):
        assert cli.main(["up", "--config", str(config), "--workdir", str(tmp_path / "w")]) == 2
    assert "encoder.weights is not set" in caplog.text
    assert not (tmp_path / "w").exists()
