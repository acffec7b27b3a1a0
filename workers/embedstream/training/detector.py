"""Fit the embedding-space anomaly detector (``embedstream train detector``) on normal inputs.

The reference rows come from files, embedded in-process with the worker's own decoding and the
encoder's own module (what Triton serves, checked against the ONNX file at export), or from a range
of an output topic, whose ``embedding`` column is used as it is. The fit itself (PCA whitening or
kNN, the threshold on held-out rows) is :func:`embedstream.anomaly.fit`; the result is the
``.safetensors`` + ``.json`` pair that ``encoder.detector`` names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstream import anomaly
from embedstream.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from embedstream.config import Settings
    from embedstream.encoders import EncoderSpec

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
Advance = Callable[[int], None]


@dataclass(frozen=True)
class Reference:
    """Normal rows to fit on, and where they came from (recorded in the sidecar)."""

    embeddings: np.ndarray
    source: dict[str, Any]


class InProcessEncoder:
    """The configured encoder in-process: the worker's decoding, then the module export serves."""

    def __init__(self, settings: Settings) -> None:

        from embedstream.encoders import describe, get_family
        from embedstream.lineage import module_fingerprint
        from embedstream.modalities import defaults, modality_for, registered

        self.settings = settings
        self.spec: EncoderSpec = describe(settings)
        if not defaults(self.spec.modality).pretrained:
            pretrained = " or ".join(m for m in registered() if defaults(m).pretrained)
            raise ConfigError(
                f"a detector is fitted for {pretrained} encoders; {self.spec.name} is {self.spec.modality} "
                "(the time-series autoencoder scores its windows itself)"
            )
        self.module: torch.nn.Module = get_family(settings.encoder.family).build(settings.encoder).eval()
        self.weights_sha256 = module_fingerprint(self.module)
        self.modality = modality_for(self.spec, settings)

    def embed(self, values: Sequence[bytes], batch_size: int = 32, advance: Advance | None = None) -> np.ndarray:
        """Embeddings of raw input message values (image files' bytes, UTF-8 texts); refuses undecodable ones."""
        import torch

        from embedstream.records import BadRecord, SourceMessage

        out = []
        for start in range(0, len(values), batch_size):
            chunk = values[start : start + batch_size]
            msgs = [SourceMessage("files", 0, start + i, None, v, 0) for i, v in enumerate(chunk)]
            items = self.modality.decode_many(msgs)
            bad = [it for it in items if isinstance(it, BadRecord)]
            if bad:
                first = bad[0]
                raise ConfigError(f"input {first.source.offset} cannot be embedded: {first.reason}: {first.message}")
            arrays = self.modality.stack(items)
            with torch.inference_mode():
                result = self.module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
            emb = result[0] if isinstance(result, (tuple, list)) else result
            out.append(emb.float().numpy())
            if advance is not None:
                advance(len(chunk))
        return np.concatenate(out) if out else np.zeros((0, self.spec.embedding_dim), np.float32)

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {"name": s.name, "version": s.version, "family": s.family, "modality": s.modality,
                "embedding_dim": s.embedding_dim, "weights_sha256": self.weights_sha256}  # fmt: skip


def read_inputs(path: Path, modality: str) -> list[bytes]:
    """A folder of images (its files, sorted, recursively) or a text file (one sentence per non-empty line)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--data {path} does not exist")
    if modality == "image":
        if not path.is_dir():
            raise ConfigError(f"--data for an image encoder is a folder of images, not {path}")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        return [p.read_bytes() for p in files]
    if path.is_dir():
        raise ConfigError(f"--data for a text encoder is a text file, one sentence per line, not the folder {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line.encode() for line in lines if line]


def reference_from_files(
    settings: Settings, data: Path, progress: bool = False, encoder: InProcessEncoder | None = None
) -> tuple[Reference, dict[str, Any]]:
    """Embed the files under ``data`` with the configured encoder -> (reference rows, encoder description)."""
    encoder = encoder or InProcessEncoder(settings)
    values = read_inputs(data, encoder.spec.modality)
    with progress_bar(progress, "embed", len(values)) as advance:
        emb = encoder.embed(values, batch_size=settings.batch.max_size, advance=advance)
    return Reference(emb, {"files": str(data), "rows": len(values)}), encoder.describe()


def reference_from_topic(
    settings: Settings,
    topic: str,
    start_offset: int | None = None,
    end_offset: int | None = None,
    partitions: Sequence[int] | None = None,
    model_name: str | None = None,
    progress: bool = False,
) -> tuple[Reference, dict[str, Any]]:
    """The ``embedding`` column of an output topic's rows in ``[start_offset, end_offset)`` of each partition.

    Offsets are message offsets (one message holds a batch of rows). ``model_name``: only that model's
    rows (a topic several models write to); rows of more than one model are refused otherwise.
    """
    from embedstream.sinks.arrow_codec import decode_embeddings, embeddings_matrix

    blocks: list[np.ndarray] = []
    models: dict[str, dict[str, str]] = {}
    messages = 0
    reading = topic_range(settings, topic, start_offset, end_offset, partitions, progress, "train-detector")
    with reading as (parts, records):
        for rec in records:
            messages += 1
            table = decode_embeddings(rec.value)
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            name = meta.get("embedstream.model_name", "")
            if model_name is not None and name != model_name:
                continue
            models.setdefault(name, meta)
            blocks.append(np.asarray(embeddings_matrix(table), np.float32))
    if len(models) > 1:
        raise ConfigError(f"{topic} holds rows of models {sorted(models)}: choose one with --model-name")
    if not blocks:
        raise ConfigError(f"no rows in {topic} offsets {start_offset}..{end_offset}")
    meta = next(iter(models.values()))
    encoder = {
        "name": meta.get("embedstream.model_name"),
        "version": meta.get("embedstream.model_version"),
        "modality": meta.get("embedstream.modality"),
        "embedding_dim": int(meta.get("embedstream.embedding_dim", "0")),
        "weights_sha256": meta.get("embedstream.weights_sha256"),
    }
    emb = np.concatenate(blocks)
    source = {"topic": topic, "start_offset": start_offset, "end_offset": end_offset, "messages": messages,
              "rows": len(emb), "partitions": parts}  # fmt: skip
    return Reference(emb, source), encoder


def fit_and_save(
    reference: Reference,
    encoder: dict[str, Any],
    out: Path,
    kind: anomaly.Kind = "mahalanobis",
    quantile: float = 0.99,
    holdout: float = 0.2,
    components: int = 64,
    k: int = 5,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> tuple[Path, anomaly.Fitted]:
    """Fit on the reference rows and write ``out`` (.safetensors) + its .json; returns the path and the fit.

    ``groups``: the source of each row, where several rows come from one source (see ``anomaly.fit``).
    """
    fitted = anomaly.fit(
        kind, reference.embeddings, quantile=quantile, holdout=holdout, components=components, k=k, seed=seed,
        encoder=encoder, groups=groups,
    )  # fmt: skip
    side = fitted.side
    fitted = anomaly.Fitted(
        fitted.tensors, type(side)(**{**side.__dict__, "training": {**side.training, "reference": reference.source}})
    )
    path = anomaly.save(fitted, out)
    log.info(
        "detector %s (%s, %d reference rows, threshold %.4g at quantile %s of %d held-out rows) for %s",
        path, kind, side.reference_rows, side.threshold, quantile, side.holdout_rows, encoder.get("name"),
    )  # fmt: skip
    return path, fitted


@contextmanager
def topic_range(
    settings: Settings,
    topic: str,
    start_offset: int | None,
    end_offset: int | None,
    partitions: Sequence[int] | None,
    progress: bool,
    client: str,
) -> Iterator[tuple[list[int], Iterator[Any]]]:
    """(partitions read, the records in ``[start_offset, end_offset)`` of each), with a bar of records read."""
    from embedstream.kafka_io import make_reader
    from embedstream.topic_reader import offset_spans, read_spans

    k = settings.kafka
    consumer = make_reader(k, client_id=f"{k.client_id}-{client}")
    try:
        spans = offset_spans(consumer, topic, start_offset, end_offset, partitions)
        parts = [s.partition for s in spans]
        with progress_bar(progress, "read", sum(s.size for s in spans)) as advance:

            def records() -> Iterator[Any]:
                for rec in read_spans(consumer, topic, spans):
                    yield rec
                    if advance is not None:
                        advance(1)

            yield parts, records()
    finally:
        consumer.close()


@contextmanager
def progress_bar(enabled: bool, what: str, total: int) -> Iterator[Advance | None]:
    """A rich bar on stderr when enabled and rich is installed (the ``tools`` extra); else nothing."""
    if not enabled:
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:
        log.info("no progress bar without rich: pip install 'embedstream[tools]'")
        yield None
        return
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True))  # fmt: skip
    with bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def roc_auc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve of scores where anomalous rows should score higher (ties count half)."""
    normal, anomalous = np.asarray(normal, np.float64), np.asarray(anomalous, np.float64)
    if not len(normal) or not len(anomalous):
        raise ValueError("ROC-AUC needs rows of both kinds")
    greater = (anomalous[:, None] > normal[None, :]).sum()
    ties = (anomalous[:, None] == normal[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(normal) * len(anomalous)))


def precision_recall(normal_flags: np.ndarray, anomalous_flags: np.ndarray) -> tuple[float, float]:
    """Precision and recall of the flags, the anomalous rows being the positives."""
    tp = int(np.sum(anomalous_flags))
    fp = int(np.sum(normal_flags))
    precision = tp / (tp + fp) if tp + fp else 0.0
    return precision, tp / len(anomalous_flags) if len(anomalous_flags) else 0.0


def export_settings(path: Path) -> str:
    """The TOML lines that serve the detector with the encoder."""
    return f'  [encoder]\n  detector = "{path}"'
