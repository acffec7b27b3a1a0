"""An embedding-space anomaly detector for any encoder, served inside the encoder's Triton model.

Fitted on embeddings of normal traffic (``embedstream train detector``), it scores each row by how
far it lands from that reference and flags rows above a threshold: the ``anomaly_score`` (FP32) and
``anomaly`` (BOOL) columns, the same pair of extra outputs the time-series autoencoder returns.

Two kinds, both measured in docs/anomaly.md:

- ``mahalanobis`` (the default): PCA whitening with a probabilistic-PCA residual. The top
  ``components`` directions of the reference are whitened by their variances and the rest of the
  space counts with the mean of the discarded variances, so the covariance is full rank however few
  rows the reference has. Score: the squared Mahalanobis distance divided by the dimension (about 1
  for normal rows).
- ``knn``: mean cosine distance to the ``k`` nearest rows of a stored reference sample.

Embeddings are L2-normalised before either (cosine geometry; a CNN's pooled feature norm mostly
tracks contrast and exposure, not content). The threshold is the ``quantile`` of the scores of
held-out normal rows, as for the autoencoder. The parameters are buffers of the served module, so
the lineage weights fingerprint covers them; they live in ``<name>.safetensors`` + ``<name>.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from embedstream.encoders import TensorSpec, read_json_sidecar
from embedstream.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from embedstream.encoders import EncoderSpec

FORMAT = "embedstream.detector/1"
Kind = Literal["mahalanobis", "knn"]
KINDS: tuple[Kind, ...] = ("mahalanobis", "knn")
SCORE_COLUMN = "anomaly_score"
FLAG_COLUMN = "anomaly"
# Where the served spec carries the detector's summary for the worker's drift monitor (no torch there).
SPEC_KEY = "detector"
_EPS = 1e-6


@dataclass(frozen=True)
class DetectorSidecar:
    """What the JSON beside the tensors says: enough to rebuild the head and to read its scores."""

    kind: Kind
    dim: int
    threshold: float
    quantile: float
    components: int = 0  # mahalanobis
    k: int = 0  # knn
    reference_rows: int = 0
    holdout_rows: int = 0
    # Held-out normal scores: the drift monitor compares a window's mean score with score_mean.
    score_mean: float = 0.0
    score_std: float = 0.0
    encoder: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> DetectorSidecar:
        data = read_json_sidecar(path, FORMAT, "detector sidecar", "`embedstream train detector` writes it")
        try:
            side = cls(**data)
        except TypeError as exc:
            raise ConfigError(f"detector sidecar {path}: {exc}") from None
        if side.kind not in KINDS:
            raise ConfigError(f"detector sidecar {path}: kind {side.kind!r} is not one of {', '.join(KINDS)}")
        return side

    def summary(self) -> dict[str, Any]:
        """The part the worker needs (threshold and the reference's score distribution), for the spec."""
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "score_mean": self.score_mean,
            "score_std": self.score_std,
        }


@dataclass(frozen=True)
class Fitted:
    """A detector's tensors (numpy) and its sidecar."""

    tensors: dict[str, np.ndarray]
    side: DetectorSidecar

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        return score(self.side.kind, self.tensors, embeddings, self.side.k)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def fit_tensors(kind: Kind, reference: np.ndarray, components: int = 64, k: int = 5) -> dict[str, np.ndarray]:
    """The detector's parameters from reference embeddings (rows of normal traffic)."""
    x = normalise(reference)
    if kind == "knn":
        return {"reference": x.astype(np.float32)}
    n, d = x.shape
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2 / max(1, n - 1)
    q = max(1, min(components, len(var) - 1, d - 1))
    # Probabilistic PCA: the discarded directions share one variance, their mean (floored so a
    # reference with fewer rows than dimensions still has a finite residual scale).
    rest = float(var[q:].sum() / max(1, d - q)) if d > q else float(var[-1])
    rest = max(rest, float(var[0]) * 1e-4, _EPS)
    return {
        "mean": mean.astype(np.float32),
        "components": vt[:q].T.astype(np.float32),  # (d, q)
        "inv_std": (1.0 / np.sqrt(var[:q] + rest * 1e-3)).astype(np.float32),
        "inv_residual_std": np.array([1.0 / np.sqrt(rest)], dtype=np.float32),
    }


def score(kind: Kind, tensors: dict[str, np.ndarray], embeddings: np.ndarray, k: int = 5) -> np.ndarray:
    """The same score the served head computes (numpy, for fitting and studies)."""
    x = normalise(embeddings)
    if kind == "knn":
        ref = tensors["reference"].astype(np.float64)
        dist = 1.0 - x @ ref.T
        kk = min(k, ref.shape[0])
        return np.sort(dist, axis=1)[:, :kk].mean(axis=1)
    return whitened_sq_distance(tensors, x) / x.shape[1]


def whitened_sq_distance(tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of rows ``x`` (already normalised) from a Mahalanobis detector's mean."""
    c = np.asarray(x, np.float64) - tensors["mean"]
    comp = tensors["components"].astype(np.float64)
    proj = c @ comp
    resid = c - proj @ comp.T
    inner = ((proj * tensors["inv_std"]) ** 2).sum(axis=1)
    outer = (resid**2).sum(axis=1) * float(tensors["inv_residual_std"][0]) ** 2
    return np.asarray(inner + outer)


def fit(
    kind: Kind,
    embeddings: np.ndarray,
    quantile: float = 0.99,
    holdout: float = 0.2,
    components: int = 64,
    k: int = 5,
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
    groups: Any = None,
) -> Fitted:
    """Fit on normal rows; the threshold is the ``quantile`` of the scores of a held-out share.

    ``groups`` (one label per row, e.g. the source a row was cut from): the held-out share is whole
    groups, so no held-out row has a near copy in the reference, which would set the threshold too low.
    """
    if kind not in KINDS:
        raise ConfigError(f"detector kind {kind!r} is not one of {', '.join(KINDS)}")
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) < 10:
        raise ConfigError(f"a detector needs at least 10 reference rows of embeddings, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("the reference embeddings hold non-finite values")
    if not 0.5 <= quantile < 1:
        raise ConfigError(f"threshold quantile must be in [0.5, 1), got {quantile}")
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(len(x))
        n_hold = max(5, round(len(x) * holdout))
        held_mask = np.zeros(len(x), bool)
        held_mask[order[:n_hold]] = True
    else:
        labels = np.asarray(groups)
        if len(labels) != len(x):
            raise ConfigError(f"{len(labels)} group labels for {len(x)} rows")
        names = rng.permutation(np.unique(labels))
        if len(names) < 2:
            raise ConfigError("a group-wise hold-out needs at least two groups")
        n_hold = min(len(names) - 1, max(1, round(len(names) * holdout)))
        held_mask = np.isin(labels, names[:n_hold])
    held, ref = x[held_mask], x[~held_mask]
    tensors = fit_tensors(kind, ref, components=components, k=k)
    held_scores = score(kind, tensors, held, k)
    side = DetectorSidecar(
        kind=kind,
        dim=x.shape[1],
        threshold=float(np.quantile(held_scores, quantile)),
        quantile=quantile,
        components=int(tensors["components"].shape[1]) if kind == "mahalanobis" else 0,
        k=k if kind == "knn" else 0,
        reference_rows=len(ref),
        holdout_rows=len(held),
        score_mean=float(held_scores.mean()),
        score_std=float(held_scores.std()),
        encoder=dict(encoder or {}),
        training={
            "rule": f"quantile {quantile} of the scores of {len(held)} held-out normal rows",
            "holdout": holdout,
            "holdout_by": "row" if groups is None else "group",
            "seed": seed,
        },
    )
    return Fitted(tensors, side)


def save(fitted: Fitted, path: Path | str) -> Path:
    """``path`` (.safetensors) and its .json sidecar; returns the safetensors path."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: np.ascontiguousarray(t) for n, t in fitted.tensors.items()}, str(path))
    fitted.side.write(path.with_suffix(".json"))
    return path


def load(path: Path | str) -> Fitted:
    from safetensors.numpy import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"encoder.detector must be a .safetensors file (its .json beside it), got {path}")
    if not path.is_file():
        raise ConfigError(f"detector file not found: {path}")
    side = DetectorSidecar.read(path.with_suffix(".json"))
    tensors = load_file(str(path))
    want = {"knn": {"reference"}, "mahalanobis": {"mean", "components", "inv_std", "inv_residual_std"}}[side.kind]
    if set(tensors) != want:
        raise ConfigError(f"detector {path}: tensors {sorted(tensors)}, a {side.kind} detector holds {sorted(want)}")
    return Fitted(tensors, side)


# --- serving: the head and the wrapper (torch) -------------------------------------------------


def head(fitted: Fitted) -> torch.nn.Module:
    """The detector as a torch module: embeddings (N, dim) -> score (N, 1) FP32, flag (N, 1) BOOL."""
    import torch

    class MahalanobisHead(torch.nn.Module):
        mean: torch.Tensor
        components: torch.Tensor
        inv_std: torch.Tensor
        inv_residual_std: torch.Tensor
        threshold: torch.Tensor

        def __init__(self, t: dict[str, np.ndarray], threshold: float) -> None:
            super().__init__()
            for name, value in t.items():
                self.register_buffer(name, torch.from_numpy(np.array(value, dtype=np.float32)))
            self.register_buffer("threshold", torch.tensor([threshold], dtype=torch.float32))

        def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = emb.float()
            x = x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)
            c = x - self.mean
            proj = c @ self.components
            resid = c - proj @ self.components.T
            inner = ((proj * self.inv_std) ** 2).sum(dim=1, keepdim=True)
            outer = (resid**2).sum(dim=1, keepdim=True) * self.inv_residual_std**2
            s = (inner + outer) / x.shape[1]
            return s, s > self.threshold

    class KnnHead(torch.nn.Module):
        reference: torch.Tensor
        threshold: torch.Tensor
        neighbours: torch.Tensor

        def __init__(self, t: dict[str, np.ndarray], threshold: float, k: int) -> None:
            super().__init__()
            self.register_buffer("reference", torch.from_numpy(np.array(t["reference"], dtype=np.float32)))
            self.register_buffer("threshold", torch.tensor([threshold], dtype=torch.float32))
            self.k = min(k, int(t["reference"].shape[0]))
            # Read by nothing at run time (topk takes the int): a buffer so the weights fingerprint covers k.
            self.register_buffer("neighbours", torch.tensor([self.k], dtype=torch.int64))

        def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = emb.float()
            x = x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)
            dist = 1.0 - x @ self.reference.T
            s = torch.topk(dist, self.k, dim=1, largest=False).values.mean(dim=1, keepdim=True)
            return s, s > self.threshold

    if fitted.side.kind == "knn":
        return KnnHead(fitted.tensors, fitted.side.threshold, fitted.side.k)
    return MahalanobisHead(fitted.tensors, fitted.side.threshold)


def wrap(module: torch.nn.Module, fitted: Fitted) -> torch.nn.Module:
    """``module``'s outputs, then the detector's score and flag computed on its embedding (output 0)."""
    import torch

    class WithDetector(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module, detector: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder
            self.detector = detector

        def outputs(self, out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            s, flag = self.detector(outs[0])
            return (*outs, s, flag)

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.outputs(self.encoder(*inputs))

    # Named inputs, as many as the encoder takes: torch.export (the dynamo ONNX exporter) maps its
    # dynamic shapes onto named arguments, not onto *inputs.
    class WithDetector1(WithDetector):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
            return self.outputs(self.encoder(x))

    class WithDetector2(WithDetector):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
            return self.outputs(self.encoder(x, y))

    import inspect

    arity = len(inspect.signature(module.forward).parameters)
    cls = {1: WithDetector1, 2: WithDetector2}.get(arity, WithDetector)
    return cls(module, head(fitted)).eval()


def with_detector_spec(spec: EncoderSpec, fitted: Fitted) -> EncoderSpec:
    """``spec`` with the detector's two outputs after the encoder's, and its summary in ``extra``."""
    if fitted.side.dim != spec.embedding_dim:
        raise ConfigError(
            f"the detector was fitted on {fitted.side.dim}-d embeddings, {spec.name} embeds in {spec.embedding_dim}"
        )
    taken = {o.column for o in spec.outputs}
    if SCORE_COLUMN in taken or FLAG_COLUMN in taken:
        raise ConfigError(f"{spec.name} already returns an anomaly flag of its own; it takes no encoder.detector")
    n = len(spec.outputs)
    outputs = (
        *spec.outputs,
        TensorSpec(f"{SCORE_COLUMN}__{n}", "FP32", (1,), SCORE_COLUMN),
        TensorSpec(f"{FLAG_COLUMN}__{n + 1}", "BOOL", (1,), FLAG_COLUMN),
    )
    return replace(spec, outputs=outputs, extra={**spec.extra, SPEC_KEY: fitted.side.summary()})


def apply(spec: EncoderSpec, module: torch.nn.Module, path: str | None) -> tuple[EncoderSpec, torch.nn.Module]:
    """The spec and module to export: unchanged without a detector, wrapped with one."""
    if path is None:
        return spec, module
    fitted = load(path)
    return with_detector_spec(spec, fitted), wrap(module, fitted)
