"""Unset weights mean packaged ones where an encoder has them; random only where it has none."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from embedstream import cli, cli_support
from embedstream.config import EncoderSettings
from embedstream.encoders import has_packaged_weights
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
        settings = cli_support.local_settings(str(CONFIGS / "worker.text.toml"))
    assert settings.encoder.family == "transformer" and settings.encoder.weights is None
    assert "random" not in caplog.text


def test_the_default_image_encoder_serves_packaged_imagenet_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="embedstream"):
        settings = cli_support.local_settings(None)
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
        cli_support.local_settings(str(config))
    message = str(err.value)
    assert "checkpoint path" in message and "'random'" in message
    assert ("'pretrained'" in message) is hub


def test_random_weights_only_when_named(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text('[encoder]\narch = "mobilenetv3_small_100"\nweights = "random"\n')
    assert cli_support.local_settings(str(config)).encoder.weights == "random"


def test_the_cli_exits_with_the_error_before_starting_anything(tmp_path, caplog):
    config = tmp_path / "worker.toml"
    config.write_text('[encoder]\narch = "mobilenetv3_small_100"\n')
    with caplog.at_level(logging.ERROR, logger="embedstream"):
        assert cli.main(["up", "--config", str(config), "--workdir", str(tmp_path / "w")]) == 2
    assert "encoder.weights is not set" in caplog.text
    assert not (tmp_path / "w").exists()


def test_up_serves_the_configs_pipeline_as_it_is_and_the_packaged_defaults_beside_it(tmp_path):
    from embedstream.local.pipelines import modality_settings

    base = cli_support.local_settings(str(CONFIGS / "worker.text.toml"))
    image, text = modality_settings(base, ["image", "text"], tmp_path)
    assert text == base
    assert (text.kafka.input_topic, text.kafka.output_topic, text.kafka.group_id) == (
        "text",
        "embeddings.text",
        "embedstream-text",
    )
    assert (image.encoder.family, image.encoder.arch, image.encoder.weights) == ("cnn", "tf_efficientnet_lite0", None)
    assert has_packaged_weights(image.encoder) and has_packaged_weights(text.encoder)
    # the image topics are the same as without a config, where produce-samples sends by default
    assert (image.kafka.input_topic, image.kafka.dead_letter_topic) == ("images", "deadletter.image")
    assert image.kafka.group_id == "embedstream-image"


def test_a_time_series_configs_batching_stays_with_the_time_series_pipeline(tmp_path):
    from embedstream.local.pipelines import modality_settings

    base = cli_support.local_settings(str(CONFIGS / "worker.timeseries.toml"))
    image, text, series = modality_settings(base, ["image", "text", "timeseries"], tmp_path)
    assert series == base  # it names its weights, so nothing is trained
    assert series.batch.max_size == 256
    assert image.batch.max_size == text.batch.max_size == 32
    assert image.encoder.max_batch_size == text.encoder.max_batch_size == 32
    # its connection settings do carry over
    assert image.kafka.session_timeout_ms == base.kafka.session_timeout_ms


def test_two_pipelines_on_one_input_topic_refuse(tmp_path):
    from embedstream.local.pipelines import modality_settings

    config = tmp_path / "worker.toml"
    config.write_text('[kafka]\ninput_topic = "text"\n')
    with pytest.raises(ConfigError, match="same input topic"):
        modality_settings(cli_support.local_settings(str(config)), ["image", "text"], tmp_path)


@pytest.mark.parametrize("modalities", ["image,audio", "", "text,text"])
def test_up_refuses_a_bad_modality_list_before_starting_anything(tmp_path, caplog, modalities):
    with caplog.at_level(logging.ERROR, logger="embedstream"):
        assert cli.main(["up", "--modalities", modalities, "--workdir", str(tmp_path / "w")]) == 2
    assert "modalities takes a comma-separated subset of image, text, timeseries" in caplog.text
    assert not (tmp_path / "w").exists()
