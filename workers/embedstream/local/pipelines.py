"""One pipeline per modality on the embedded stack: its encoder and its topics, from one base config.

The demo, ``embedstream up`` and the bench run one pipeline per registered modality. The base config
is the pipeline of its own encoder's modality, as it is (its topics, batching and limits included);
every other modality gets the defaults it declares (``ModalityDefaults``): images the packaged
EfficientNet-Lite0, text the packaged all-MiniLM-L6-v2, time series an autoencoder trained on the
bundled normal data. Those take only the base's connection settings (broker security, delivery,
Triton protocol and timeouts), so e.g. a time-series config's batch of 256 does not become the image
pipeline's batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embedstream.config import Settings, load_settings
from embedstream.errors import ConfigError
from embedstream.modalities import defaults, registered

MODALITIES: tuple[str, ...] = registered()
# Sections that belong to one pipeline besides each modality's own: a derived pipeline starts from their defaults.
_PIPELINE_SECTIONS = ("encoder", "batch")


def modality_of(settings: Settings) -> str | None:
    """The modality a config's encoder serves (None for a family the local stack does not know).

    The null encoder serves the modality of the encoder its arch names (``cnn/tf_efficientnet_lite0``).
    """
    enc = settings.encoder
    family = enc.arch.split("/", 1)[0] if enc.family == "null" else enc.family
    return next((m for m in MODALITIES if family in defaults(m).families), None)


def _own_sections() -> tuple[str, ...]:
    return (*_PIPELINE_SECTIONS, *(s for m in MODALITIES for s in defaults(m).sections))


def with_modality(base: Settings, modality: str, encoder: dict[str, Any], **extra: dict[str, Any]) -> Settings:
    """A pipeline of ``modality`` beside ``base``: the defaults with ``encoder`` over the encoder's, the
    modality's own topics and consumer group, and ``base``'s broker and Triton connection settings."""
    data = base.model_dump(mode="json")
    for section in _own_sections():
        data[section] = Settings.model_fields[section].default.model_dump(mode="json")
    data["encoder"].update(encoder)
    topics = defaults(modality).topics
    data["kafka"].update(
        input_topic=topics.input,
        output_topic=topics.output,
        dead_letter_topic=topics.dead_letter,
        group_id=topics.group_id,
        # Shared with the base pipeline, one transactional id would fence the other's producer.
        transactional_id=None,
    )
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return load_settings(**data)


def default_pipeline(base: Settings, modality: str, **encoder: Any) -> Settings:
    """``modality``'s pipeline beside ``base`` as the modality declares it, ``encoder`` over its encoder."""
    d = defaults(modality)
    enc: dict[str, Any] = {**d.encoder, **encoder}
    if d.batch_size is None:
        return with_modality(base, modality, enc)
    return with_modality(base, modality, {**enc, "max_batch_size": d.batch_size}, batch={"max_size": d.batch_size})


def derived_settings(base: Settings, modality: str) -> Settings:
    """The base config as it is when its encoder serves ``modality``; otherwise the modality's defaults."""
    if modality_of(base) == modality:
        return base
    return default_pipeline(base, modality)


def image_settings(base: Settings) -> Settings:
    return derived_settings(base, "image")


def text_settings(base: Settings) -> Settings:
    return derived_settings(base, "text")


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
    weights = train_normal(Path(workdir) / "timeseries", defaults("timeseries").families[0])
    return default_pipeline(base, "timeseries", weights=str(weights))


def train_normal(root: Path, family: str = "autoencoder") -> Path:
    """Fit a time-series encoder on the bundled generator's normal data; returns its weights file.

    With ``EMBEDSTREAM_EXPORT_CACHE`` set, a fit of the same code, family and window is copied from
    there (file times kept, so its export is a cache hit too): the fit is seeded, so it would be the same.
    """
    import shutil

    from embedstream.export.cache import cache_dir, cached_entry, source_digest

    window = defaults("timeseries").window
    if window is None:
        raise ConfigError("the time-series modality declares no window to fit its encoders on")
    cached = cache_dir()
    if cached is None:
        return _fit_normal(root, family, window)
    entry = cached / f"fit-{family}-w{window}-{source_digest().hex()[:16]}"
    weights = cached_entry(entry, lambda staging: str(_fit_normal(staging, family, window).relative_to(staging)))
    shutil.copytree(entry, root, dirs_exist_ok=True)
    return root / weights


def _fit_normal(root: Path, family: str, window: int) -> Path:
    import pyarrow.csv as pcsv

    from embedstream.training import synthetic
    from embedstream.training.fit import TrainConfig, train_from_file

    root.mkdir(parents=True, exist_ok=True)
    pcsv.write_csv(synthetic.normal_table(16, 600, seed=0), str(root / "normal.csv"))
    weights = train_from_file(root / "normal.csv", root / "weights", (family,), TrainConfig(window=window))
    return weights[family]


def parse_modalities(raw: str) -> list[str]:
    """``image,text`` -> the modalities named, in that order; ConfigError for an unknown or empty list."""
    named = [m.strip() for m in raw.split(",") if m.strip()]
    unknown = [m for m in named if m not in MODALITIES]
    if unknown or not named or len(set(named)) != len(named):
        raise ConfigError(f"modalities takes a comma-separated subset of {', '.join(MODALITIES)}, not {raw!r}")
    return named


def _maker(base: Settings, modality: str, workdir: Path) -> Callable[[], Settings]:
    if not defaults(modality).pretrained:
        # Fitted here on generated data, which only the time-series generator provides.
        return lambda: timeseries_settings(base, workdir)
    return lambda: derived_settings(base, modality)


def modality_settings(base: Settings, modalities: Sequence[str], workdir: Path) -> list[Settings]:
    """Settings of each named modality's pipeline, in the order given.

    ConfigError when two pipelines would share an input topic or a consumer group (a base config
    whose topics are another modality's defaults): their workers would take each other's messages.
    """
    makers: dict[str, Callable[[], Settings]] = {m: _maker(base, m, workdir) for m in MODALITIES}
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
