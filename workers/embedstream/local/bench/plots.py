"""PNG plots of a benchmark run: throughput per stage per modality, latency at 50% load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedstream.local.bench.report import STAGES, ModalityBench, percentile


def _pyplot() -> Any:
    import matplotlib

    # No display here or in CI: render to files only.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def throughput_plot(results: Sequence[ModalityBench], path: Path) -> Path:
    plt = _pyplot()
    stages = [s for s in STAGES if any(s in b.stages for b in results)]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(results)), 4.5))
    width = 0.8 / max(1, len(stages))
    x = np.arange(len(results))
    for i, stage in enumerate(stages):
        values = [b.stages[stage].throughput if stage in b.stages else 0.0 for b in results]
        bars = ax.bar(x + (i - (len(stages) - 1) / 2) * width, values, width, label=STAGES[stage])
        ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, [f"{b.modality}\n{b.model}" for b in results], fontsize=8)
    # Raw Kafka runs orders of magnitude above a CNN on CPU: a log axis keeps every bar readable.
    ax.set_yscale("log")
    ax.set_ylabel("messages / s (log)")
    ax.set_title("throughput per stage")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_plot(results: Sequence[ModalityBench], path: Path) -> Path:
    plt = _pyplot()
    with_lat = [b for b in results if b.latencies_ms]
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in with_lat:
        lat = np.sort(np.asarray(b.latencies_ms))
        p50, p99 = percentile(b.latencies_ms, 50), percentile(b.latencies_ms, 99)
        label = f"{b.modality} (p50 {p50:.0f}, p99 {p99:.0f} ms)"
        hist.hist(lat, bins=40, alpha=0.5, label=label)
        cdf.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=b.modality)
    hist.set_xlabel("latency ms (output timestamp - input timestamp)")
    hist.set_ylabel("messages")
    hist.set_title("latency at 50% of saturation")
    cdf.set_xscale("log")
    # Labelled minor ticks on a log axis overlap into noise: keep only the decades.
    cdf.xaxis.set_minor_formatter(plt.NullFormatter())
    cdf.set_xlabel("latency ms (log)")
    cdf.set_ylabel("share of messages")
    cdf.axhline(0.99, color="grey", lw=0.5, ls="--")
    cdf.set_title("CDF")
    for ax in (hist, cdf):
        if with_lat:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
