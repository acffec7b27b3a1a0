"""Training data from a file: Parquet or CSV, one row per observation, per-series windows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedstream.errors import ConfigError

log = logging.getLogger(__name__)


def read_table(path: Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training data not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pcsv

        opts = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        return pcsv.read_csv(path, parse_options=opts)
    raise ConfigError(f"training data must be .parquet or .csv, got {path}")


def load_series(
    path: Path,
    channels: Sequence[str] | None = None,
    series_column: str = "series_id",
    time_column: str = "timestamp_ms",
) -> tuple[list[np.ndarray], list[str]]:
    """Per-series (N_i x C) float32 arrays in time order, and the channel names.

    Without a series column the file is one series; without a time column, file order is time
    order. Channels default to every numeric column but those two. Rows with a non-finite value
    are dropped (normal data should have none; they are counted in the log).
    """
    table = read_table(path)
    names = table.column_names
    if channels is None:
        channels = [
            n
            for n in names
            if n not in (series_column, time_column)
            and (pa.types.is_floating(table.schema.field(n).type) or pa.types.is_integer(table.schema.field(n).type))
        ]
    missing = [c for c in channels if c not in names]
    if missing or not channels:
        raise ConfigError(f"{path}: channel columns {missing or '(none found)'} not in {names}")
    values = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in channels])
    series = (
        np.asarray(table.column(series_column).cast(pa.string()).to_pylist())
        if series_column in names
        else np.zeros(len(values), dtype=object)
    )
    times = table.column(time_column).to_numpy(zero_copy_only=False) if time_column in names else np.arange(len(values))
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        log.warning("%s: dropping %d rows with non-finite values", path, int((~finite).sum()))
    out: list[np.ndarray] = []
    for sid in dict.fromkeys(series[finite].tolist()):
        rows = np.flatnonzero(finite & (series == sid))
        rows = rows[np.argsort(times[rows], kind="stable")]
        out.append(values[rows].astype(np.float32))
    return out, list(channels)


def make_windows(series: Sequence[np.ndarray], length: int, stride: int) -> np.ndarray:
    """(M, length, C) sliding windows of every series long enough for one."""
    parts = []
    for arr in series:
        if len(arr) < length:
            continue
        view = np.lib.stride_tricks.sliding_window_view(arr, length, axis=0)[::stride]  # (m, C, length)
        parts.append(np.ascontiguousarray(view.transpose(0, 2, 1)))
    if not parts:
        raise ConfigError(f"no series has the {length} points one window needs")
    return np.concatenate(parts).astype(np.float32)


def split_holdout(series: Sequence[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first (1 - fraction) of each series to train on, the rest held out (no window spans both)."""
    train, held = [], []
    for arr in series:
        cut = round(len(arr) * (1 - fraction))
        train.append(arr[:cut])
        held.append(arr[cut:])
    return train, held
