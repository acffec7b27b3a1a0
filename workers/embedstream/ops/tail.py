"""``embedstream tail TOPIC``: decode Arrow embeddings from an output topic; optionally a 2-D PCA plot."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from embedstream.sinks.arrow_codec import decode_embeddings, embeddings_matrix
from embedstream.topic_reader import assign_all


def format_row(row: dict[str, Any], vector: np.ndarray, dims: int) -> str:
    """One line per embedding: id, where it came from, which model, the first dims and the L2 norm."""
    head = ", ".join(f"{x:+.4f}" for x in vector[:dims])
    more = ", ..." if vector.shape[0] > dims else ""
    where = f"{row['source_topic']}/{row['source_partition']}@{row['source_offset']}"
    model = f"{row['model_name']}:{row['model_version']}"
    return f"{row['id']}  {where}  {model}  dim={vector.shape[0]}  [{head}{more}]  norm={np.linalg.norm(vector):.4f}"


def table_lines(table: pa.Table, dims: int) -> Iterator[str]:
    matrix = embeddings_matrix(table)
    rows = table.select(["id", "source_topic", "source_partition", "source_offset", "model_name", "model_version"])
    for row, vector in zip(rows.to_pylist(), matrix, strict=True):
        yield format_row(row, vector, dims)


def pca_2d(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components; also the explained-variance ratios."""
    x = np.asarray(matrix, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2)), np.zeros(2)
    # SVD of the centred data: its right singular vectors are the principal axes.
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    coords = np.zeros((x.shape[0], 2))
    coords[:, :k] = x @ vt[:k].T
    var = s**2
    ratio = np.zeros(2)
    ratio[:k] = var[:k] / var.sum() if var.sum() > 0 else 0.0
    return coords, ratio


def plot_pca(matrix: np.ndarray, groups: list[str], path: Path, title: str) -> None:
    import matplotlib

    # No display in a pod or CI; Agg writes files only.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords, ratio = pca_2d(matrix)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    for name in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == name]
        ax.scatter(coords[idx, 0], coords[idx, 1], s=12, alpha=0.7, label=name)
    ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.1%} of variance)")
    ax.set_title(f"{title}: {len(groups)} embeddings")
    if len(set(groups)) > 1:
        ax.legend(fontsize=8, markerscale=1.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@dataclass
class Sample:
    """Up to ``limit`` embeddings kept for the plot, labelled by model name and version."""

    limit: int
    parts: list[tuple[np.ndarray, list[str]]] = field(default_factory=list)
    size: int = 0

    def add(self, table: pa.Table) -> None:
        room = self.limit - self.size
        if room <= 0:
            return
        table = table.slice(0, room)
        models = table.column("model_name").to_pylist()
        versions = table.column("model_version").to_pylist()
        self.parts.append((embeddings_matrix(table), [f"{m}:{v}" for m, v in zip(models, versions, strict=True)]))
        self.size += table.num_rows

    def data(self) -> tuple[np.ndarray, list[str]]:
        """The sampled rows with the first dim seen (another model's vectors cannot share its axes)."""
        dim = self.parts[0][0].shape[1]
        kept = [(m, g) for m, g in self.parts if m.shape[1] == dim]
        return np.concatenate([m for m, _ in kept]), [x for _, g in kept for x in g]


@dataclass
class _Printer:
    """What one tail has printed so far, kept as it goes so that Ctrl-C still reports it."""

    dims: int
    emit: Callable[[str], None]
    max_rows: int | None
    sample: Sample | None
    rows: int = 0
    bad: int = 0

    @property
    def counts(self) -> tuple[int, int]:
        return self.rows, self.bad

    def print_record(self, rec: ConsumerRecord) -> bool:
        """True once max_rows rows are printed; a message that does not decode never ends the tail."""
        try:
            table = decode_embeddings(rec.value)
        except Exception as exc:  # any bytes can be on a topic; one bad message must not end the tail
            self.bad += 1
            self.emit(f"# {rec.topic}/{rec.partition}@{rec.offset}: not an embedstream Arrow message ({exc})")
            return False
        if self.max_rows is not None:
            table = table.slice(0, self.max_rows - self.rows)
        for line in table_lines(table, self.dims):
            self.emit(line)
        self.rows += table.num_rows
        if self.sample is not None:
            self.sample.add(table)
        return self.max_rows is not None and self.rows >= self.max_rows


def _assign_all(
    consumer: KafkaConsumer, topic: str, from_beginning: bool
) -> tuple[list[TopicPartition], dict[TopicPartition, int]]:
    tps = assign_all(consumer, [topic], from_beginning=from_beginning)
    return tps, consumer.end_offsets(tps)


def tail(
    consumer: KafkaConsumer,
    topic: str,
    *,
    from_beginning: bool,
    follow: bool,
    max_rows: int | None,
    timeout_s: float | None,
    dims: int,
    emit: Callable[[str], None],
    sample: Sample | None = None,
    caught_up_idle_s: float = 1.5,
) -> tuple[int, int]:
    """Print rows until max_rows, the end (unless following), the timeout or Ctrl-C; returns (rows, bad messages)."""
    tps, end = _assign_all(consumer, topic, from_beginning)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out = _Printer(dims, emit, max_rows, sample)
    last_record = time.monotonic()
    try:
        while True:
            for _tp, records in consumer.poll(timeout_ms=300).items():
                last_record = time.monotonic()
                for rec in records:
                    if out.print_record(rec):
                        return out.counts
            # Past the reported end and quiet for a moment: some brokers (the embedded Tansu) under-report
            # end offsets, so the reported end alone would stop early.
            caught_up = all(consumer.position(tp) >= end[tp] for tp in tps)
            if not follow and caught_up and time.monotonic() - last_record > caught_up_idle_s:
                return out.counts
            if deadline is not None and time.monotonic() > deadline:
                return out.counts
    except KeyboardInterrupt:
        return out.counts
