"""Generated multi-channel signals: normal data to train on, and test data with injected anomalies.

Each channel is a sinusoid with its own period and amplitude (random phase per series, a little
amplitude jitter) plus Gaussian noise. Anomalies are injected inside chosen windows so that the
label of a window ("contains injected points") is unambiguous: a spike (one point far off), a level
shift (the rest of the window moved up or down) or a frequency change (one channel oscillating
about 2.5x faster for the whole window).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

PERIODS = (16.0, 24.0, 40.0)
AMPLITUDES = (1.0, 0.8, 1.2)
NOISE = 0.08
KINDS = ("spike", "level_shift", "frequency")
START_MS = 1_700_000_000_000
STEP_MS = 1000


def normal_signal(n: int, rng: np.random.Generator, channels: int = 3, start: int = 0) -> np.ndarray:
    """(n, channels) float32: one series of the normal process, from step ``start`` on."""
    t = np.arange(start, start + n, dtype=np.float64)[:, None]
    periods = np.array([PERIODS[c % len(PERIODS)] for c in range(channels)])
    amps = np.array([AMPLITUDES[c % len(AMPLITUDES)] for c in range(channels)]) * rng.uniform(0.95, 1.05, channels)
    phase = rng.uniform(0, 2 * np.pi, channels)
    clean = amps * np.sin(2 * np.pi * t / periods + phase)
    return (clean + rng.normal(0, NOISE, (n, channels))).astype(np.float32)


def normal_table(n_series: int, n_points: int, seed: int = 0, channels: int = 3) -> pa.Table:
    """Normal training data in the layout ``embedstream train`` reads: series_id, timestamp_ms, ch0..."""
    rng = np.random.default_rng(seed)
    ids, times, values = [], [], []
    for s in range(n_series):
        ids += [f"train-{s}"] * n_points
        times.append(START_MS + STEP_MS * np.arange(n_points, dtype=np.int64))
        values.append(normal_signal(n_points, rng, channels))
    data = np.concatenate(values)
    cols = {"series_id": pa.array(ids), "timestamp_ms": pa.array(np.concatenate(times))}
    cols |= {f"ch{c}": pa.array(data[:, c]) for c in range(channels)}
    return pa.table(cols)


@dataclass(frozen=True)
class LabelledSignal:
    values: np.ndarray  # (n_windows * length, channels) float32
    labels: np.ndarray  # (n_windows,) bool: the window holds injected points
    kinds: tuple[str, ...]  # per window: "" or one of KINDS
    length: int

    def windows(self) -> np.ndarray:
        return self.values.reshape(len(self.labels), self.length, -1)


def labelled_signal(
    n_windows: int, length: int, seed: int = 1, channels: int = 3, anomaly_rate: float = 0.25
) -> LabelledSignal:
    """One continuous series cut into tumbling windows, a share of them with one injected anomaly each."""
    rng = np.random.default_rng(seed)
    values = normal_signal(n_windows * length, rng, channels).astype(np.float64)
    labels = np.zeros(n_windows, dtype=bool)
    labels[rng.choice(n_windows, size=round(n_windows * anomaly_rate), replace=False)] = True
    kinds: list[str] = []
    k = 0
    for w in range(n_windows):
        if not labels[w]:
            kinds.append("")
            continue
        kind = KINDS[k % len(KINDS)]
        k += 1
        kinds.append(kind)
        lo = w * length
        c = int(rng.integers(channels))
        amp = AMPLITUDES[c % len(AMPLITUDES)]
        sign = rng.choice([-1.0, 1.0])
        if kind == "spike":
            values[lo + int(rng.integers(length)), c] += sign * amp * rng.uniform(5.0, 7.0)
        elif kind == "level_shift":
            at = lo + int(rng.integers(length // 4, length // 2))
            values[at : lo + length, c] += sign * amp * rng.uniform(1.5, 2.5)
        else:
            t = np.arange(length)
            fast = PERIODS[c % len(PERIODS)] / 2.5
            values[lo : lo + length, c] = amp * np.sin(2 * np.pi * t / fast + rng.uniform(0, 2 * np.pi))
            values[lo : lo + length, c] += rng.normal(0, NOISE, length)
    return LabelledSignal(values.astype(np.float32), labels, tuple(kinds), length)


def precision_recall(flags: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    flags, labels = np.asarray(flags, bool), np.asarray(labels, bool)
    tp = int((flags & labels).sum())
    precision = tp / max(1, int(flags.sum()))
    recall = tp / max(1, int(labels.sum()))
    return precision, recall
