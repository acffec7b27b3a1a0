"""``embedstream train``: fit the time-series encoders on normal data from a Parquet/CSV file.

Reading the training data from a topic range is not implemented: export the normal stretch to a
file first. The command prints the ``[encoder]`` settings that ``embedstream export-models`` (and
the worker) then take.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def register(sub: Any, flag: Callable[..., None]) -> dict[str, Handler]:
    p = sub.add_parser("train", help="fit the lstm/autoencoder time-series encoders on normal data (Parquet/CSV)")
    flag(p, "--data", "TRAIN_DATA", "normal data: .parquet or .csv, columns series_id, timestamp_ms, channels...")
    flag(p, "--out", "TRAIN_OUT", "directory for <family>.safetensors and <family>.json", default="weights")
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
    flag(p, "--threshold-quantile", "TRAIN_THRESHOLD_Q", "quantile of held-out error", default="0.995", type=float)
    flag(p, "--seed", "TRAIN_SEED", "random seed", default="0", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return {"train": cmd_train}


def cmd_train(args: argparse.Namespace) -> int:
    from embedstream.errors import ConfigError
    from embedstream.training.fit import FAMILIES, TrainConfig, train_from_file

    if not args.data:
        raise ConfigError("--data is required (a .parquet or .csv file of normal data)")
    cfg = TrainConfig(
        window=args.window,
        stride=args.stride,
        holdout=args.holdout,
        threshold_quantile=args.threshold_quantile,
        seed=args.seed,
        ae_hidden=args.hidden,
        latent=args.latent,
        ae_epochs=args.epochs,
        lstm_hidden=args.lstm_hidden,
        lstm_epochs=args.lstm_epochs,
    )
    families = FAMILIES if args.family == "both" else (args.family,)
    channels = [c.strip() for c in args.channels.split(",")] if args.channels else None
    paths = train_from_file(Path(args.data), Path(args.out), families, cfg, channels, progress=not args.no_progress)
    for family, path in paths.items():
        print(f"{family}: {path} (+ {path.with_suffix('.json').name})")
        print(f'  [encoder]\n  family = "{family}"\n  weights = "{path}"')
    return 0
