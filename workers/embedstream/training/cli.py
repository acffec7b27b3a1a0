"""``embedstream train``: fit the time-series encoders on normal data from a Parquet/CSV file or a
range of an input topic (observations and windows, as the worker reads them), and
``embedstream train detector``: fit the embedding-space anomaly detector of an image or text encoder
on normal inputs (a folder of images, a text file of sentences) or on a range of an output topic.

The command prints the ``[encoder]`` settings that ``embedstream export-models`` (and the worker)
then take.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embedstream.cli_support import Commands, flag, settings_from_args

if TYPE_CHECKING:
    from embedstream.training.fit import TrainConfig


def register(sub: argparse._SubParsersAction) -> Commands:
    p = sub.add_parser(
        "train",
        help="fit the lstm/autoencoder time-series encoders on normal data (Parquet/CSV); "
        "`train detector`: an image/text encoder's anomaly detector",
    )
    p.add_argument(
        "target",
        nargs="?",
        default="timeseries",
        choices=["timeseries", "detector"],
        help="what to fit: the time-series encoders (default) or an embedding-space anomaly detector",
    )
    flag(
        p,
        "--data",
        "TRAIN_DATA",
        "normal data: .parquet or .csv, columns series_id, timestamp_ms, channels...; for a detector: "
        "a folder of images or a text file, one sentence per line",
    )
    flag(
        p,
        "--out",
        "TRAIN_OUT",
        "directory for <family>.safetensors and <family>.json; for a detector, a directory (for "
        "detector-<model>.safetensors) or the .safetensors path",
        default="weights",
    )
    d = p.add_argument_group("detector (`embedstream train detector`)")
    flag(d, "--config", "CONFIG", "worker TOML config: the encoder to fit for (and the brokers for --topic)")
    flag(d, "--kind", "TRAIN_DETECTOR_KIND", "detector", default="mahalanobis", choices=["mahalanobis", "knn"])
    flag(d, "--components", "TRAIN_DETECTOR_COMPONENTS", "mahalanobis: whitened directions", default="64", type=int)
    flag(d, "--k", "TRAIN_DETECTOR_K", "knn: neighbours averaged", default="5", type=int)
    flag(
        d,
        "--topic",
        "TRAIN_TOPIC",
        "instead of --data: the normal reference from a topic range (detector: an output topic's rows; "
        "time series: an input topic's observations and windows)",
    )
    flag(d, "--bootstrap", "KAFKA__BOOTSTRAP_SERVERS", "Kafka bootstrap servers (overrides the config file)")
    flag(d, "--partition", "TRAIN_PARTITIONS", "comma-separated partitions of --topic (default: all)")
    flag(d, "--start-offset", "TRAIN_START_OFFSET", "first message offset, per partition", type=int)
    flag(d, "--end-offset", "TRAIN_END_OFFSET", "end offset, exclusive (default: the end now)", type=int)
    flag(d, "--model-name", "TRAIN_MODEL_NAME", "only this model's rows of --topic")
    flag(p, "--family", "TRAIN_FAMILY", "what to fit", default="both", choices=["lstm", "autoencoder", "both"])
    flag(p, "--channels", "TRAIN_CHANNELS", "comma-separated channel columns (default: every numeric column)")
    flag(p, "--window", "TRAIN_WINDOW", "window length in points", default="32", type=int)
    flag(p, "--stride", "TRAIN_STRIDE", "stride between training windows", default="4", type=int)
    flag(p, "--epochs", "TRAIN_EPOCHS", "autoencoder epochs", default="40", type=int)
    flag(p, "--lstm-epochs", "TRAIN_LSTM_EPOCHS", "lstm epochs", default="8", type=int)
    flag(p, "--hidden", "TRAIN_HIDDEN", "autoencoder hidden layer width", default="64", type=int)
    flag(p, "--latent", "TRAIN_LATENT", "autoencoder latent size (its embedding dimension)", default="8", type=int)
    flag(p, "--lstm-hidden", "TRAIN_LSTM_HIDDEN", "lstm hidden size (its embedding dimension)", default="16", type=int)
    flag(p, "--holdout", "TRAIN_HOLDOUT", "share of each series held out for the threshold", default="0.2", type=float)
    flag(
        p,
        "--threshold-quantile",
        "TRAIN_THRESHOLD_Q",
        "quantile of held-out error (unset: 0.995; a detector's: 0.99)",
        type=float,
    )
    flag(p, "--seed", "TRAIN_SEED", "random seed", default="0", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return {"train": cmd_train}


def cmd_train(args: argparse.Namespace) -> int:
    from embedstream.errors import ConfigError
    from embedstream.training.fit import FAMILIES, TrainConfig, train_from_file

    if args.target == "detector":
        return cmd_train_detector(args)
    if bool(args.data) == bool(args.topic):
        raise ConfigError("give --data (a .parquet or .csv file of normal data) or --topic (an input topic), not both")
    cfg = TrainConfig(
        window=args.window,
        stride=args.stride,
        holdout=args.holdout,
        threshold_quantile=0.995 if args.threshold_quantile is None else args.threshold_quantile,
        seed=args.seed,
        ae_hidden=args.hidden,
        latent=args.latent,
        ae_epochs=args.epochs,
        lstm_hidden=args.lstm_hidden,
        lstm_epochs=args.lstm_epochs,
    )
    families = FAMILIES if args.family == "both" else (args.family,)
    channels = [c.strip() for c in args.channels.split(",")] if args.channels else None
    if args.topic:
        paths = _train_from_topic(args, families, cfg)
    else:
        paths = train_from_file(Path(args.data), Path(args.out), families, cfg, channels, progress=not args.no_progress)
    for family, path in paths.items():
        print(f"{family}: {path} (+ {path.with_suffix('.json').name})")
        print(f'  [encoder]\n  family = "{family}"\n  weights = "{path}"')
    return 0


def _train_from_topic(args: argparse.Namespace, families: Sequence[str], cfg: TrainConfig) -> dict[str, Path]:
    from embedstream.training.fit import train
    from embedstream.training.topic_series import series_from_topic

    settings = settings_from_args(args)
    read = series_from_topic(
        settings, args.topic, args.start_offset, args.end_offset, _partitions(args), progress=not args.no_progress
    )
    points = sum(len(s) for s in read.series)
    print(f"read {read.source['messages']} messages of {args.topic}: {len(read.series)} series, {points} points")
    return train(read.series, Path(args.out), families, cfg, read.channels, progress=not args.no_progress)


def _partitions(args: argparse.Namespace) -> list[int] | None:
    from embedstream.errors import ConfigError

    try:
        return [int(x) for x in args.partition.split(",")] if args.partition else None
    except ValueError:
        raise ConfigError(f"--partition: not a comma-separated list of numbers: {args.partition!r}") from None


def cmd_train_detector(args: argparse.Namespace) -> int:
    from embedstream.errors import ConfigError
    from embedstream.training import detector

    if bool(args.data) == bool(args.topic):
        raise ConfigError("give --data (a folder of images or a text file of sentences) or --topic, one of them")
    settings = settings_from_args(args)
    progress = not args.no_progress
    if args.topic:
        reference, encoder = detector.reference_from_topic(
            settings, args.topic, args.start_offset, args.end_offset, _partitions(args), args.model_name, progress
        )
    else:
        reference, encoder = detector.reference_from_files(settings, Path(args.data), progress)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        out = out / f"detector-{encoder.get('name') or 'model'}.safetensors"
    path, fitted = detector.fit_and_save(
        reference,
        encoder,
        out,
        kind=args.kind,
        quantile=0.99 if args.threshold_quantile is None else args.threshold_quantile,
        holdout=args.holdout,
        components=args.components,
        k=args.k,
        seed=args.seed,
    )
    side = fitted.side
    print(f"detector: {path} (+ {path.with_suffix('.json').name})")
    print(
        f"  {side.kind}, {side.reference_rows} reference rows, threshold {side.threshold:.6g} "
        f"(quantile {side.quantile} of {side.holdout_rows} held-out rows; their mean {side.score_mean:.4g})"
    )
    print(detector.export_settings(path))
    return 0
