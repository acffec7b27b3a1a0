"""How much the embeddings mean: nearest-neighbour retrieval of known groups, over what was read back.

A group is a set of inputs that should land near each other (the copies of one photo, the
paraphrases of one sentence). For every row whose group has another row in the set, the question
is whether its nearest other rows by cosine belong to the same group. Random embeddings answer
that at chance; an encoder that carries meaning answers it near 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Retrieval:
    """Fractions over the ``anchors`` rows whose group has at least one other row."""

    anchors: int
    top1: float
    top5: float
    # what embeddings that carry nothing would score on the same rows, on average
    chance_top1: float
    chance_top5: float


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (rows, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # an all-zero row has no direction: it is then nobody's near neighbour, not a crash
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def grouped_rows(
    keys: Sequence[bytes | None], embeddings: np.ndarray, groups: Mapping[bytes, Hashable]
) -> tuple[list[Hashable], np.ndarray]:
    """The rows whose key has a group, each key once (a redelivered row must not be its own neighbour)."""
    if len(keys) != len(embeddings):
        raise ValueError(f"{len(keys)} keys but {len(embeddings)} embeddings")
    seen: set[bytes] = set()
    labels: list[Hashable] = []
    picked: list[int] = []
    for i, key in enumerate(keys):
        if key is None or key in seen or key not in groups:
            continue
        seen.add(key)
        labels.append(groups[key])
        picked.append(i)
    return labels, np.asarray(embeddings)[picked]


def _chance_hit(pool: int, positives: int, k: int) -> float:
    """P(at least one of k draws without replacement from ``pool`` others is one of ``positives``)."""
    k = min(k, pool)
    if positives <= 0:
        return 0.0
    miss = 1.0
    for j in range(k):
        miss *= (pool - positives - j) / (pool - j) if pool - positives - j > 0 else 0.0
    return 1.0 - miss


def retrieval(labels: Sequence[Hashable], embeddings: np.ndarray, k: int = 5) -> Retrieval:
    """Top-1 and top-``k`` nearest-neighbour hit rates by cosine (self excluded), with chance levels.

    A hit at top-k: at least one of the k most similar other rows shares the anchor's group.
    """
    n = len(labels)
    if n != len(embeddings):
        raise ValueError(f"{n} labels but {len(embeddings)} embeddings")
    if n < 2:
        return Retrieval(0, float("nan"), float("nan"), float("nan"), float("nan"))
    index: dict[Hashable, int] = {}
    codes = np.asarray([index.setdefault(g, len(index)) for g in labels])
    sizes = np.bincount(codes)
    anchors = np.flatnonzero(sizes[codes] > 1)
    if len(anchors) == 0:
        return Retrieval(0, float("nan"), float("nan"), float("nan"), float("nan"))
    unit = _unit_rows(embeddings)
    sim = unit[anchors] @ unit.T
    sim[np.arange(len(anchors)), anchors] = -np.inf
    kk = min(k, n - 1)
    # stable sort: ties (e.g. identical rows) resolve by row order, not by chance
    order = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
    same = codes[order] == codes[anchors][:, None]
    positives = sizes[codes[anchors]] - 1
    return Retrieval(
        anchors=len(anchors),
        top1=float(same[:, 0].mean()),
        top5=float(same.any(axis=1).mean()),
        chance_top1=float(np.mean([_chance_hit(n - 1, int(p), 1) for p in positives])),
        chance_top5=float(np.mean([_chance_hit(n - 1, int(p), kk) for p in positives])),
    )


def keyed_retrieval(
    keys: Sequence[bytes | None], embeddings: np.ndarray, groups: Mapping[bytes, Hashable], k: int = 5
) -> Retrieval:
    """:func:`retrieval` over the rows of an output table whose keys ``groups`` names."""
    labels, rows = grouped_rows(keys, embeddings, groups)
    return retrieval(labels, rows, k)
