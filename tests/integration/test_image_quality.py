"""The default image encoder's embeddings mean something, measured through the pipeline.

Real photos go through the real broker, a worker process and Triton serving tf_efficientnet_lite0
twice: with its packaged ImageNet weights (the default) and with ``weights = "random"``. The rows
read back from the output topic are what is measured: the checkpoint's own classifier head on them,
agreement with timm's own preprocessing, and linear probes run by examples/linear_probe.py.

The stack here is this module's own: measured on 2 cores, serving both Lite0 variants beside the
session's MobileNet added 33 s to the session stack's start (21 s -> 54 s) for every integration run,
while a stack of their own starts in 34 s and stops in 4 s, only when this module runs.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from embedstream.config import Settings, load_settings
from embedstream.encoders import _packaged_images, get_family
from embedstream.local.samples.photos import Photo, imagenet_photos, natural_photos, photo_stream
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.modalities.image import DecodedImage, decode_image
from embedstream.records import SourceMessage
from embedstream.service import encoder_spec
from embedstream.sinks.arrow_codec import embeddings_matrix

from .helpers import assert_serves_checked_onnx, private_topics, produce, read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARCH = "tf_efficientnet_lite0"
PRETRAINED = f"image-{ARCH}"
RANDOM = f"image-{ARCH}-random"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "linear_probe.py"


@pytest.fixture(scope="module")
def quality_stack(tmp_path_factory) -> Iterator[LocalStack]:
    packaged = load_settings(encoder={"arch": ARCH})  # weights unset: the packaged ImageNet weights
    random = load_settings(encoder={"arch": ARCH, "weights": "random", "model_name": RANDOM})
    with LocalStack([packaged, random], workdir=tmp_path_factory.mktemp("quality-stack"), partitions=2) as stack:
        yield stack


@dataclass
class Embedded:
    settings: Settings  # the first model's lane: its topics are every model's
    table: pa.Table

    def vectors(self, model: str) -> dict[str, np.ndarray]:
        rows = self.table.filter(pc.equal(self.table.column("model_name"), model))
        return dict(zip(rows.column("id").to_pylist(), embeddings_matrix(rows), strict=True))


def embed(stack: LocalStack, workdir: Path, name: str, messages: list[tuple[bytes, bytes]], models: Sequence[str]):
    """Each model's worker (a group of its own) reads the same input topic and writes one output topic."""
    served = {s.encoder.model_name or f"image-{s.encoder.arch}": s for s in stack.all_settings}
    lane = private_topics(served[models[0]], name, partitions=2)
    lanes = [lane] + [
        served[m].model_copy(update={"kafka": lane.kafka.model_copy(update={"group_id": f"{lane.kafka.group_id}-{i}"})})
        for i, m in enumerate(models[1:], start=1)
    ]
    produce(lane.kafka.bootstrap_servers, lane.kafka.input_topic, messages)
    workers = [WorkerProcess(s, workdir, f"worker-{i}").start() for i, s in enumerate(lanes)]
    try:
        result = read_all(lane, len(messages) * len(lanes), timeout_s=240)
    finally:
        for w in workers:
            w.terminate()
    assert not result.dead_letters, [(d.key, d.reason) for d in result.dead_letters]
    table = result.table()
    per_model = Counter(table.column("model_name").to_pylist())
    assert per_model == dict.fromkeys(models, len(messages)), per_model
    return Embedded(lane, table)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def top_k(logits: torch.Tensor, labels: list[int], k: int) -> float:
    top = logits.topk(k).indices.tolist()
    return sum(label in row for row, label in zip(top, labels, strict=True)) / len(labels)


def run_probe(embedded: Embedded, labels: dict[str, str], model: str, workdir: Path) -> tuple[float, str]:
    """examples/linear_probe.py on the output topic, as a user runs it; (mean accuracy, its report)."""
    path = workdir / f"labels-{model}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label"])
        writer.writerows(sorted(labels.items()))
    k = embedded.settings.kafka
    args = ["--bootstrap", k.bootstrap_servers, "--topic", k.output_topic, "--labels", str(path), "--folds", "5"]
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), *args, "--model-name", model, "--timeout-s", "30"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert f"rows labelled: {len(labels)}, rows without a label: 0, labels without a row: 0" in out.stdout
    found = re.search(rf"accuracy \({re.escape(model)}, .*\): ([0-9.]+) ± ([0-9.]+)", out.stdout)
    assert found, out.stdout
    return float(found.group(1)), out.stdout


# --- the 20 labeled ImageNet photos ------------------------------------------------------------------


def test_the_stack_serves_onnx_checked_against_eager_at_export(quality_stack):
    # The torch.export-based exporter: its CNN graph is the faster one in ONNX Runtime (docs/models.md).
    assert_serves_checked_onnx(quality_stack, exporter="dynamo")


@pytest.fixture(scope="module")
def imagenet(quality_stack, tmp_path_factory) -> tuple[list[Photo], np.ndarray, Settings]:
    photos = imagenet_photos()
    assert len(photos) == 20
    workdir = tmp_path_factory.mktemp("imagenet")
    embedded = embed(
        quality_stack, workdir, "imagenet", [(p.name.encode(), p.path.read_bytes()) for p in photos], [PRETRAINED]
    )
    vectors = embedded.vectors(PRETRAINED)
    return photos, np.stack([vectors[p.name] for p in photos]), embedded.settings


def test_the_checkpoints_own_head_classifies_the_pipelines_embeddings(imagenet):
    photos, emb, settings = imagenet
    assert emb.shape == (20, 1280)
    head = _packaged_images.load(ARCH).get_classifier()
    with torch.inference_mode():
        logits = head(torch.from_numpy(emb))
    labels = [p.label for p in photos]
    top1, top5 = top_k(logits, labels, 1), top_k(logits, labels, 5)
    print(f"ImageNet photos through the pipeline: top-1 {top1:.2f}, top-5 {top5:.2f}")
    assert top1 >= 0.8 and top5 >= 0.95, (top1, top5)

    # And the rows are exactly what the served network computes from the worker's decode.
    spec = encoder_spec(settings)
    decoded = [
        decode_image(SourceMessage("t", 0, i, None, p.path.read_bytes(), 0), spec.preprocessing, settings.limits)
        for i, p in enumerate(photos)
    ]
    assert all(isinstance(d, DecodedImage) for d in decoded)
    encoder = get_family("cnn").build(settings.encoder)
    with torch.inference_mode():
        want = encoder(torch.from_numpy(np.stack([d.pixels for d in decoded]))).numpy()
    assert cosine(emb, want).min() >= 0.999, cosine(emb, want)


def test_the_pipelines_embeddings_match_timms_own_preprocessing(imagenet):
    from timm.data import create_transform, resolve_data_config

    photos, emb, _ = imagenet
    model = _packaged_images.pooled(ARCH)
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.inference_mode():
        want = model(torch.stack([transform(p.open()) for p in photos])).numpy()
    cos = cosine(emb, want)
    print("cosine to timm's own preprocessing per photo:", np.round(cos, 4).tolist())
    assert cos.min() >= 0.999, cos.min()


# --- linear probes: packaged weights against random ones ---------------------------------------------


def test_faces_are_linearly_separable_from_the_pretrained_embeddings_only(quality_stack, tmp_path):
    from skimage import data

    images = data.lfw_subset()  # 200 greyscale 25x25: 100 faces, then 100 non-faces
    assert images.shape == (200, 25, 25)
    keys = [f"lfw-{i:03d}" for i in range(len(images))]
    messages = [(k.encode(), png((img * 255).round().astype(np.uint8))) for k, img in zip(keys, images, strict=True)]
    embedded = embed(quality_stack, tmp_path, "lfw", messages, [PRETRAINED, RANDOM])
    labels = {k: "face" if i < 100 else "non-face" for i, k in enumerate(keys)}
    pretrained, _ = run_probe(embedded, labels, PRETRAINED, tmp_path)
    random, _ = run_probe(embedded, labels, RANDOM, tmp_path)
    print(f"lfw_subset face / non-face, 5-fold: pretrained {pretrained:.4f}, random {random:.4f}")
    assert pretrained >= 0.95
    # Rounded: one fold's accuracy moves in steps of 1/40, and 0.995 - 0.965 is a hair under 0.03 in floats.
    assert round(pretrained - random, 4) >= 0.03, (pretrained, random)


def test_augmented_copies_are_matched_to_their_photo_from_the_pretrained_embeddings_only(quality_stack, tmp_path):
    photos = natural_photos()
    copies = 10
    stream = list(photo_stream(copies * len(photos), seed=15, photos=photos, prefix="aug"))
    assert Counter(m.source for m in stream) == dict.fromkeys((p.name for p in photos), copies)
    embedded = embed(quality_stack, tmp_path, "augmented", [(m.key, m.value) for m in stream], [PRETRAINED, RANDOM])
    labels = {m.key.decode(): str(m.source) for m in stream}
    pretrained, _ = run_probe(embedded, labels, PRETRAINED, tmp_path)
    random, _ = run_probe(embedded, labels, RANDOM, tmp_path)
    print(
        f"which of {len(photos)} photos ({copies} copies each), 5-fold: packaged {pretrained:.4f}, random {random:.4f}"
    )
    assert pretrained >= 0.9
    assert pretrained - random >= 0.3, (pretrained, random)
