"""One pipeline per modality on the embedded stack: its encoder and its topics, from one base config.

The demo, ``embedstream up`` and the bench run the same three pipelines: images through the base
config's encoder (the packaged EfficientNet-Lite0 unless configured otherwise), text through the
packaged all-MiniLM-L6-v2, time series through an autoencoder trained on the bundled normal data
when the config names no weights for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embedstream.config import Settings, load_settings

MODALITIES = ("image", "text", "timeseries")

# A window costs the autoencoder microseconds, so a batch of 16 or 32 is mostly per-request cost
# (the RPC, Arrow, a produce): 256 drained a backlog about 3x faster than 16 (1,900 -> 5,700 windows/s).
TIMESERIES_BATCH = 256
TIMESERIES_WINDOW = 32


def with_modality(base: Settings, modality: str, encoder: dict[str, Any], **extra: dict[str, Any]) -> Settings:
    """``base`` with ``encoder`` over its encoder and the modality's own topics and consumer group."""
    data = base.model_dump(mode="json")
    data["encoder"] = {**data["encoder"], **encoder}
    data["kafka"].update(
        input_topic=modality,
        output_topic=f"embeddings.{modality}",
        dead_letter_topic=f"deadletter.{modality}",
        group_id=f"embedstream-{modality}",
    )
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return load_settings(**data)


def image_settings(base: Settings) -> Settings:
    """The base config as it is: its encoder is the image encoder unless it names another family."""
    if base.encoder.family in ("cnn", "null"):
        return base
    return with_modality(
        base, "image", {"family": "cnn", "arch": "tf_efficientnet_lite0", "weights": None, "model_name": None}
    )


def text_settings(base: Settings) -> Settings:
    if base.encoder.family == "transformer":
        return base
    return with_modality(
        base, "text", {"family": "transformer", "arch": "all-MiniLM-L6-v2", "weights": None, "model_name": None}
    )


def timeseries_settings(base: Settings, workdir: Path) -> Settings:
    """The autoencoder trained here on generated normal data (seconds) unless ``base`` brings its own."""
    own = base.encoder.family in ("autoencoder", "lstm")
    if own and base.encoder.weights:
        return base
    family = base.encoder.family if own else "autoencoder"
    weights = train_normal(Path(workdir) / "timeseries", family)
    return with_modality(
        base,
        "timeseries",
        {
            "family": family,
            "weights": str(weights),
            "arch": family,
            "model_name": None,
            "max_batch_size": TIMESERIES_BATCH,
        },
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


def modality_settings(base: Settings, modalities: Sequence[str], workdir: Path) -> list[Settings]:
    """Settings of each named modality's pipeline, in the order given."""
    makers: dict[str, Callable[[], Settings]] = {
        "image": lambda: image_settings(base),
        "text": lambda: text_settings(base),
        "timeseries": lambda: timeseries_settings(base, workdir),
    }
    unknown = [m for m in modalities if m not in makers]
    if unknown or not modalities:
        from embedstream.errors import ConfigError

        raise ConfigError(f"modalities must be a comma-separated subset of {', '.join(MODALITIES)}, not {unknown}")
    return [makers[m]() for m in modalities]
