"""How well the embedding-space detector tells normal inputs from out-of-distribution ones (docs/anomaly.md).

``python -m embedstream.local.detector_study`` embeds real inputs in-process with the packaged
encoders (EfficientNet-Lite0 ImageNet weights, all-MiniLM-L6-v2), fits both detector kinds on normal
rows and prints ROC-AUC and precision/recall at the fitted threshold on unseen normal inputs vs
out-of-distribution ones:

- images: the detector is fitted on augmented copies (``local.samples.photos.augment``) of the photo stream's
  photos and scored on copies of photographs from other packages (scikit-learn's, matplotlib's,
  scikit-image's motorcycle and cameraman), which the fit never saw, vs out-of-distribution images:
  scikit-image's textures, drawings, documents and test charts, its microscopy and retina images
  (reported apart as near out-of-distribution: photographs, but not of everyday scenes), and
  generated flat, noise and stripe images.
- text: ``text-docs`` is fitted on first docstring lines of some standard-library modules and scored
  on the other modules' vs the everyday sentences of ``local.samples.paraphrases``; ``text-everyday`` the
  other way round (fitted on some paraphrase groups, scored on the others vs docstrings).

The threshold's hold-out is whole sources (photos, modules, paraphrase groups), so it is set on
inputs the reference has no copy of. ``tests/integration/test_anomaly.py`` runs the image study
through Triton.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from embedstream import anomaly
from embedstream.local.samples.ood import NEAR_OOD, ood_images, unseen_photos

# Standard-library modules whose docstrings give the off-topic sentences.
DOC_MODULES = (
    "os.path", "json", "shutil", "string", "textwrap", "pathlib", "itertools", "functools", "zipfile",
    "tarfile", "csv", "base64", "hashlib", "heapq", "bisect", "random", "statistics", "fractions",
)  # fmt: skip


@dataclass(frozen=True)
class Split:
    """Raw inputs: ``fit`` (normal, for fitting), ``normal`` (unseen normal), ``ood`` (out of distribution)."""

    fit: list[bytes]
    normal: list[bytes]
    ood: list[bytes]
    ood_names: list[str]
    # The source of each fit row (a photo, a paraphrase group, a module): the threshold's hold-out is whole groups.
    fit_groups: list[int]


def image_split(fit_copies: int = 8, test_copies: int = 6, seed: int = 0) -> Split:
    """Copies of the photo stream's photos to fit on; copies of other packages' photos as unseen normal; OOD."""
    from embedstream.local.samples.photos import augment, encode, natural_photos

    rng = np.random.default_rng(seed)

    def copies(img: Image.Image, n: int) -> list[bytes]:
        return [encode(augment(img, rng), ("JPEG", "PNG", "WEBP")[int(rng.integers(0, 3))], 85) for _ in range(n)]

    photos = natural_photos()
    fit = [c for photo in photos for c in copies(photo.open(), fit_copies)]
    normal = [c for img in unseen_photos() for c in copies(img, test_copies)]
    ood, names = ood_images(rng)
    return Split(fit, normal, ood, names, [i for i in range(len(photos)) for _ in range(fit_copies)])


def docstring_groups() -> list[list[str]]:
    """Per module of :data:`DOC_MODULES`: the first docstring lines (5 words or more) of its public callables."""
    import importlib

    seen: set[str] = set()
    groups = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        lines = []
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            doc = "" if attr.startswith("_") or not callable(obj) else (inspect.getdoc(obj) or "").strip()
            line = doc.splitlines()[0].strip() if doc else ""
            if len(line.split()) >= 5 and line not in seen:
                seen.add(line)
                lines.append(line)
        groups.append(lines)
    return groups


def text_split(domain: str = "docs", test_every: int = 3) -> Split:
    """``docs``: fitted on standard-library docstrings of some modules, scored on the other modules' vs
    the everyday sentences; ``everyday``: fitted on some paraphrase groups, scored on the others vs docstrings."""
    from embedstream.local.samples.paraphrases import PARAPHRASES

    everyday = [list(g) for g in PARAPHRASES]
    docs = docstring_groups()
    own, other = (docs, everyday) if domain == "docs" else (everyday, docs)
    fit: list[bytes] = []
    normal: list[bytes] = []
    groups: list[int] = []
    for i, group in enumerate(own):
        if i % test_every == test_every - 1:
            normal.extend(t.encode() for t in group)
        else:
            fit.extend(t.encode() for t in group)
            groups.extend([i] * len(group))
    ood = [t for g in other for t in g]
    return Split(fit, normal, [t.encode() for t in ood], ood, groups)


@dataclass(frozen=True)
class Result:
    modality: str
    kind: str
    auc: float
    precision: float
    recall: float
    false_positive_rate: float
    threshold: float
    fit_rows: int
    normal_rows: int
    ood_rows: int


def evaluate(
    modality: str,
    fit: np.ndarray,
    normal: np.ndarray,
    ood: np.ndarray,
    kind: anomaly.Kind,
    groups: Sequence[int] | None = None,
    **params: Any,
) -> Result:
    from embedstream.training.detector import precision_recall, roc_auc

    fitted = anomaly.fit(kind, fit, groups=groups, **params)
    s_normal, s_ood = fitted.score(normal), fitted.score(ood)
    t = fitted.side.threshold
    precision, recall = precision_recall(s_normal > t, s_ood > t)
    return Result(modality, kind, roc_auc(s_normal, s_ood), precision, recall, float(np.mean(s_normal > t)), t,
                  len(fit), len(normal), len(ood))  # fmt: skip


def embed(settings_encoder: dict[str, object], values: Sequence[bytes]) -> np.ndarray:
    from embedstream.config import load_settings
    from embedstream.training.detector import InProcessEncoder

    settings = load_settings(encoder=settings_encoder)
    return InProcessEncoder(settings).embed(values)


def table(results: Sequence[Result]) -> str:
    lines = [
        "| modality | detector | ROC-AUC | precision | recall | normal flagged | fit rows | unseen normal | OOD |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.modality} | {r.kind} | {r.auc:.3f} | {r.precision:.3f} | {r.recall:.3f} | "
            f"{r.false_positive_rate:.3f} | {r.fit_rows} | {r.normal_rows} | {r.ood_rows} |"
        )
    return "\n".join(lines)


# Study name -> the encoder settings it embeds with (the packaged weights).
STUDIES: dict[str, dict[str, Any]] = {
    "image": {"family": "cnn", "arch": "tf_efficientnet_lite0"},
    "text-docs": {"family": "transformer", "arch": "all-MiniLM-L6-v2"},
    "text-everyday": {"family": "transformer", "arch": "all-MiniLM-L6-v2"},
}


def run_study(
    name: str, seed: int = 0, components: int = 8, k: int = 30, quantile: float = 0.99
) -> tuple[list[Result], dict[str, Result]]:
    """Both kinds on one study; for images also the near-OOD (microscopy, retina) rows alone, Mahalanobis."""
    enc = STUDIES[name]
    split = image_split(seed=seed) if name == "image" else text_split(name.split("-", 1)[1])
    fit, normal, ood = (embed(enc, v) for v in (split.fit, split.normal, split.ood))
    results = []
    for kind in anomaly.KINDS:
        results.append(
            evaluate(name, fit, normal, ood, kind, split.fit_groups, components=components, k=k, seed=seed,
                     quantile=quantile)
        )  # fmt: skip
    extra = {}
    if name == "image":
        near = np.array([n.rsplit("-", 1)[0] in NEAR_OOD for n in split.ood_names])
        for label, rows in (("far", ~near), ("near", near)):
            extra[label] = evaluate(f"image ({label} OOD only)", fit, normal, ood[rows], "mahalanobis",
                                    split.fit_groups, components=components, seed=seed, quantile=quantile)  # fmt: skip
    return results, extra


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, of {', '.join(STUDIES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--quantile", type=float, default=0.99, help="threshold: quantile of held-out normal scores")
    args = parser.parse_args(argv)
    results: list[Result] = []
    for name in args.studies.split(","):
        both, extra = run_study(name, args.seed, args.components, args.k, args.quantile)
        results += both + list(extra.values())
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
