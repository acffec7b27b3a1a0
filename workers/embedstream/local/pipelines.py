"""One pipeline per modality on the embedded stack: its encoder and its topics, from one base config.

The demo, ``embedstream up`` and the bench run the same three pipelines. The base config is the
pipeline of its own encoder's modality, as it is (its topics, batching and limits included); every
other modality gets its defaults: images the packaged EfficientNet-Lite0, text the packaged
all-MiniLM-L6-v2, time series an autoencoder trained on the bundled normal data. Those take only the
base's connection settings (broker security, delivery, Triton protocol and timeouts), so e.g. a
time-series config's batch of 256 does not become the image pipeline's batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embedstream.config import (
    BatchSettings,
    EncoderSettings,
    ImageLimits,
    Settings,
    TextLimits,
    TimeSeriesSettings,
    load_settings,
)
from embedstream.errors import ConfigError

MODALITIES = ("image", "text", "timeseries")
FAMILIES: dict[str, tuple[str, ...]] = {
    "image": ("cnn",),
    "text": ("transformer",),
    "timeseries": ("autoencoder", "lstm"),
}
# (input, output, dead-letter, consumer group) of a modality that is not the base config's. The image
# names are KafkaSettings' defaults (and produce-samples' topic), so the image pipeline has the same
# topics whether or not a config is given.
TOPICS: dict[str, tuple[str, str, str, str]] = {
    "image": ("images", "embeddings.image", "deadletter.image", "embedstream-image"),
    "text": ("text", "embeddings.text", "deadletter.text", "embedstream-text"),
    "timeseries": ("timeseries", "embeddings.timeseries", "deadletter.timeseries", "embedstream-timeseries"),
}
# Sections that belong to one pipeline: a modality derived from the base starts from their defaults.
_OWN_SECTIONS: dict[str, type[Any]] = {
    "encoder": EncoderSettings,
    "batch": BatchSettings,
    "limits": ImageLimits,
    "text": TextLimits,
    "timeseries": TimeSeriesSettings,
}

# A window costs the autoencoder microseconds, so a batch of 16 or 32 is mostly per-request cost
# (the RPC, Arrow, a produce): 256 drained a backlog about 3x faster than 16 (1,900 -> 5,700 windows/s).
TIMESERIES_BATCH = 256
TIMESERIES_WINDOW = 32


def modality_of(settings: Settings) -> str | None:
    """The modality a config's encoder serves (None for a family the local stack does not know).

    The null encoder serves the modality of the encoder its arch names (``cnn/tf_efficientnet_lite0``).
    """
    enc = settings.encoder
    family = enc.arch.split("/", 1)[0] if enc.family == "null" else enc.family
    return next((m for m, families in FAMILIES.items() if family in families), None)


def with_modality(base: Settings, modality: str, encoder: dict[str, Any], **extra: dict[str, Any]) -> Settings:
    """A pipeline of ``modality`` beside ``base``: the defaults with ``encoder`` over the encoder's, the
    modality's own topics and consumer group, and ``base``'s broker and Triton connection settings."""
    data = base.model_dump(mode="json")
    for section, cls in _OWN_SECTIONS.items():
        data[section] = cls().model_dump(mode="json")
    data["encoder"].update(encoder)
    input_topic, output_topic, dead_letter_topic, group_id = TOPICS[modality]
    data["kafka"].update(
        input_topic=input_topic,
        output_topic=output_topic,
        dead_letter_topic=dead_letter_topic,
        group_id=group_id,
        # Shared with the base pipeline, one transactional id would fence the other's producer.
        transactional_id=None,
    )
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return load_settings(**data)


def image_settings(base: Settings) -> Settings:
    """The base config as it is when its encoder is an image one; otherwise the default image encoder."""
    if modality_of(base) == "image":
        return base
    return with_modality(base, "image", {})


def text_settings(base: Settings) -> Settings:
    if modality_of(base) == "text":
        return base
    return with_modality(base, "text", {"family": "transformer", "arch": "all-MiniLM-L6-v2"})


def trains_timeseries(base: Settings) -> bool:
    """Whether the time-series pipeline of ``base`` needs ``train_normal`` first (no weights named)."""
    return not (modality_of(base) == "timeseries" and base.encoder.weights)


def timeseries_settings(base: Settings, workdir: Path) -> Settings:
    """The autoencoder trained here on generated normal data (seconds) unless ``base`` brings its own."""
    if not trains_timeseries(base):
        return base
    if modality_of(base) == "timeseries":
        # A time-series config without weights: its own pipeline, with the family it names trained here.
        weights = train_normal(Path(workdir) / "timeseries", base.encoder.family)
        return base.model_copy(update={"encoder": base.encoder.model_copy(update={"weights": str(weights)})})
    weights = train_normal(Path(workdir) / "timeseries", "autoencoder")
    return with_modality(
        base,
        "timeseries",
        {"family": "autoencoder", "arch": "autoencoder", "weights": str(weights), "max_batch_size": TIMESERIES_BATCH},
        batch={"max_size": TIMESERIES_BATCH},
    )


def train_normal(root: Path, family: str = "autoencoder") -> Path:
    """Fit a time-series encoder on the bundled generator's normal data; returns its weights file."""
    import pyarrow.csv as pcsv

    from embedstream.training import synthetic
    from embedstream.training.fit import TrainConfig, train_from_file

    root.mkdir(parents=True, exist_ok=True)
    pcsv.write_csv(synthetic.normal_table(16, 600, seed=0), str(root / "normal.csv"))
    weights = train_from_file(root / "normal.csv", root / "weights", (family,), TrainConfig(window=TIMESERIES_WINDOW))
    return weights[family]


def parse_modalities(raw: str) -> list[str]:
    """``image,text`` -> the modalities named, in that order; ConfigError for an unknown or empty list."""
    named = [m.strip() for m in raw.split(",") if m.strip()]
    unknown = [m for m in named if m not in MODALITIES]
    if unknown or not named or len(set(named)) != len(named):
        raise ConfigError(f"modalities takes a comma-separated subset of {', '.join(MODALITIES)}, not {raw!r}")
    return named


def modality_settings(base: Settings, modalities: Sequence[str], workdir: Path) -> list[Settings]:
    """Settings of each named modality's pipeline, in the order given.

    ConfigError when two pipelines would share an input topic or a consumer group (a base config
    whose topics are another modality's defaults): their workers would take each other's messages.
    """
    makers: dict[str, Callable[[], Settings]] = {
        "image": lambda: image_settings(base),
        "text": lambda: text_settings(base),
        "timeseries": lambda: timeseries_settings(base, workdir),
    }
    unknown = [m for m in modalities if m not in makers]
    if unknown or not modalities:
        raise ConfigError(f"modalities must be a comma-separated subset of {', '.join(MODALITIES)}, not {unknown}")
    out = [makers[m]() for m in modalities]
    for what, values in (
        ("input topic", [s.kafka.input_topic for s in out]),
        ("consumer group", [s.kafka.group_id for s in out]),
    ):
        if len(set(values)) != len(values):
            pairs = ", ".join(f"{m}: {v}" for m, v in zip(modalities, values, strict=True))
            raise ConfigError(
                f"two pipelines have the same {what} ({pairs}): give the config's pipeline names of its own"
            )
    return out
