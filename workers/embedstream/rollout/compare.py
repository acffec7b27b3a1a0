"""Two versions side by side on what they stored: rows each has, the overlap of their k nearest
neighbours on a sample of ids, and the drift of the anomaly score where the models produce one.

Vectors of two versions live in different spaces, so they are never compared to each other: each id's
neighbours are found in each version's own table, and the neighbour *ids* are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedstream.ops.search import search_by_id


@dataclass(frozen=True)
class ScoreDrift:
    column: str
    mean_old: float
    mean_new: float
    flagged_old: float  # share of rows flagged anomalous
    flagged_new: float
    mean_abs_change: float  # per id, over ids both versions stored
    rank_correlation: float  # Spearman, over the same ids


@dataclass(frozen=True)
class Comparison:
    rows_old: int
    rows_new: int
    ids_only_old: int
    ids_only_new: int
    k: int
    sample: int
    overlap_mean: float  # mean share of an id's k nearest neighbours both versions agree on
    overlap_min: float
    scores: ScoreDrift | None


def _ids(table: Any) -> set[str]:
    return {str(i) for i in table.to_arrow().column("id").to_pylist()}


# The anomaly score of each model kind: an embedding detector's, or a time-series autoencoder's own.
SCORE_COLUMNS = ("anomaly_score", "reconstruction_error")


def _scores(table: Any, ids: list[str], column: str) -> dict[str, tuple[float, bool]]:
    cols = table.to_arrow().select(["id", column, "anomaly"])
    wanted = pc.is_in(cols.column("id"), value_set=pa.array(ids))
    rows = cols.filter(wanted).to_pylist()
    return {str(r["id"]): (float(r[column]), bool(r["anomaly"])) for r in rows}


def _rank(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values))
    return ranks


def score_drift(old: Any, new: Any, ids: list[str]) -> ScoreDrift | None:
    both = set(old.schema.names) & set(new.schema.names)
    column = next((c for c in SCORE_COLUMNS if c in both), None)
    if column is None or "anomaly" not in both or not ids:
        return None
    a, b = _scores(old, ids, column), _scores(new, ids, column)
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    x = np.array([a[i][0] for i in shared])
    y = np.array([b[i][0] for i in shared])
    rho = float(np.corrcoef(_rank(x), _rank(y))[0, 1]) if len(shared) > 1 else 1.0
    return ScoreDrift(
        column,
        float(x.mean()),
        float(y.mean()),
        float(np.mean([a[i][1] for i in shared])),
        float(np.mean([b[i][1] for i in shared])),
        float(np.abs(x - y).mean()),
        rho,
    )


def compare(old: Any, new: Any, k: int = 10, sample: int = 100, seed: int = 0) -> Comparison:
    """``old`` and ``new`` are the two versions' LanceDB tables."""
    ids_old, ids_new = _ids(old), _ids(new)
    shared = sorted(ids_old & ids_new)
    rng = np.random.default_rng(seed)
    picked = [shared[i] for i in rng.choice(len(shared), min(sample, len(shared)), replace=False)] if shared else []
    overlaps = []
    for row_id in picked:
        near_old = {h.id for h in search_by_id(old, row_id, k)}
        near_new = {h.id for h in search_by_id(new, row_id, k)}
        overlaps.append(len(near_old & near_new) / k)
    return Comparison(
        rows_old=old.count_rows(),
        rows_new=new.count_rows(),
        ids_only_old=len(ids_old - ids_new),
        ids_only_new=len(ids_new - ids_old),
        k=k,
        sample=len(picked),
        overlap_mean=float(np.mean(overlaps)) if overlaps else 0.0,
        overlap_min=float(np.min(overlaps)) if overlaps else 0.0,
        scores=score_drift(old, new, picked),
    )
