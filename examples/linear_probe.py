"""Linear probe: how well a logistic regression tells labelled classes apart from a topic's embeddings.

Reads every row of an embedstream output topic (Arrow IPC messages), joins a ``key,label`` CSV on the
row id (the input message's key, or the ``id`` of a JSON envelope), and prints the accuracy of a
logistic regression under stratified k-fold cross-validation, with the row counts behind it. A probe
well above chance says the embeddings carry the distinction; random-weight encoders sit far lower.

    python examples/linear_probe.py --bootstrap 127.0.0.1:9092 --topic embeddings.image \\
        --labels labels.csv --folds 5

Needs embedstream and scikit-learn (the ``tools`` extra).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedstream.config import KafkaSettings
from embedstream.kafka_io import make_reader
from embedstream.sinks.arrow_codec import decode_embeddings, embeddings_matrix
from embedstream.topic_reader import offset_spans, read_spans


@dataclass
class Rows:
    """The embeddings read, one per row id (a redelivered row replaces its earlier copy), and what was skipped."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    read: int = 0
    other_models: Counter[str] = field(default_factory=Counter)
    undecodable: int = 0
    models: set[str] = field(default_factory=set)

    @property
    def duplicates(self) -> int:
        return self.read - sum(self.other_models.values()) - len(self.vectors)


def read_rows(
    bootstrap: str, topic: str, timeout_s: float, model_name: str | None = None, read_committed: bool = False
) -> Rows:
    """Every row on ``topic`` from the beginning to the end of the log as it is now."""
    consumer = make_reader(
        KafkaSettings(bootstrap_servers=bootstrap),
        auto_offset_reset="earliest",
        read_committed=read_committed,
        settings_fetch_sizes=False,
    )
    rows = Rows()
    try:
        for rec in read_spans(consumer, topic, offset_spans(consumer, topic), idle_timeout_s=timeout_s):
            try:
                table = decode_embeddings(rec.value)
            except Exception:  # any bytes can be on a topic; count them instead of giving up on the rest
                rows.undecodable += 1
                continue
            rows.read += table.num_rows
            names = table.column("model_name").to_pylist()
            ids = table.column("id").to_pylist()
            matrix = embeddings_matrix(table)
            for row_id, name, vector in zip(ids, names, matrix, strict=True):
                if model_name is not None and name != model_name:
                    rows.other_models[name] += 1
                    continue
                rows.models.add(name)
                rows.vectors[row_id] = vector
    finally:
        consumer.close()
    return rows


def read_labels(path: Path) -> dict[str, str]:
    """``key,label`` rows (a header row ``key,label`` is allowed); the key is the row id."""
    labels: dict[str, str] = {}
    with path.open(newline="") as f:
        for line, record in enumerate(csv.reader(f), start=1):
            if not record or (line == 1 and [c.strip().lower() for c in record] == ["key", "label"]):
                continue
            if len(record) != 2:
                raise ValueError(f"{path}:{line}: expected 'key,label', got {record!r}")
            labels[record[0]] = record[1]
    return labels


def cross_validate(x: np.ndarray, y: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """Accuracy of each fold: L2-regularised logistic regression on the embeddings as they are."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    model = LogisticRegression(max_iter=5000)
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores: np.ndarray = cross_val_score(model, x, np.asarray(y), cv=splits, scoring="accuracy")
    return scores


def join(rows: Rows, labels: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(row ids with a label, their labels, the report's count lines)."""
    # Sorted: the folds then depend on the rows, not on the order partitions happened to be read in.
    ids = sorted(i for i in rows.vectors if i in labels)
    skipped = [
        f"other models skipped: {dict(rows.other_models)}" if rows.other_models else "",
        f"undecodable messages: {rows.undecodable}" if rows.undecodable else "",
        f"duplicate rows dropped: {rows.duplicates}" if rows.duplicates else "",
    ]
    y = [labels[i] for i in ids]
    per_class = Counter(y)
    lines = [
        f"rows read: {rows.read}" + "".join(f", {s}" for s in skipped if s),
        f"rows labelled: {len(ids)}, rows without a label: {len(rows.vectors) - len(ids)}, "
        f"labels without a row: {len(set(labels) - set(rows.vectors))}",
        f"classes: {len(per_class)} ({', '.join(f'{c} {n}' for c, n in sorted(per_class.items()))})",
    ]
    return ids, y, lines


def probe(rows: Rows, ids: list[str], y: list[str], folds: int) -> tuple[str, np.ndarray]:
    """The accuracy line and the fold accuracies; ValueError where the rows cannot support ``folds`` folds."""
    if len(rows.models) > 1:
        raise ValueError(f"rows of several models {sorted(rows.models)}: choose one with --model-name")
    per_class = Counter(y)
    if len(per_class) < 2:
        raise ValueError("need labelled rows of at least two labels")
    if min(per_class.values()) < folds:
        raise ValueError(f"each label needs at least --folds {folds} rows; the smallest has {min(per_class.values())}")
    scores = cross_validate(np.stack([rows.vectors[i] for i in ids]), y, folds)
    model = next(iter(rows.models))
    line = f"accuracy ({model}, logistic regression, {folds}-fold stratified): {scores.mean():.4f} ± {scores.std():.4f}"
    return line, scores


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    p.add_argument("--topic", default="embeddings.image", help="the output topic to read")
    p.add_argument("--labels", type=Path, required=True, help="CSV of key,label (key = the row id)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--model-name", help="only rows of this served model (a topic may carry several)")
    p.add_argument(
        "--timeout-s", type=float, default=30.0, help="give up when a partition brings nothing for this long"
    )
    p.add_argument("--read-committed", action="store_true", help="for topics written with exactly-once delivery")
    args = p.parse_args(argv)
    if args.folds < 2:
        p.error("--folds must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    labels = read_labels(args.labels)
    rows = read_rows(args.bootstrap, args.topic, args.timeout_s, args.model_name, args.read_committed)
    ids, y, lines = join(rows, labels)
    print("\n".join(lines), flush=True)
    try:
        line, _ = probe(rows, ids, y, args.folds)
    except ValueError as exc:
        print(f"linear_probe: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
