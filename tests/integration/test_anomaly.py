"""The embedding-space anomaly detector served by Triton inside EfficientNet-Lite0, measured on real images.

The detector is fitted in-process (``embedstream train detector``'s code) on augmented copies of the
photo stream's photos; Triton then serves the encoder with it, a worker process embeds photos from
other packages (never seen by the fit) and out-of-distribution images (scikit-image's textures,
drawings, test charts, microscopy and retina images, generated flat, noise and stripe images), and
what is measured is the ``anomaly_score``/``anomaly`` columns read back from the output topic.
docs/anomaly.md has the figures and the study behind the choice of detector.

The stack is this module's own (Lite0 with a detector); it starts in ~30 s on 2 cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedstream.cli import main as cli_main
from embedstream.config import load_settings
from embedstream.encoders import _detector as detector
from embedstream.local.stack import LocalStack
from embedstream.local.worker_process import WorkerProcess
from embedstream.sinks.arrow_codec import embeddings_matrix
from embedstream.training.detector import (
    InProcessEncoder,
    Reference,
    fit_and_save,
    precision_recall,
    reference_from_topic,
    roc_auc,
)
from embedstream.training.detector_study import NEAR_OOD, image_split

from .helpers import private_topics, produce, read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARCH = "tf_efficientnet_lite0"
MIN_AUC = 0.9


@pytest.fixture(scope="module")
def split():
    return image_split(seed=0)


@pytest.fixture(scope="module")
def fitted(split, tmp_path_factory) -> tuple[Path, InProcessEncoder]:
    settings = load_settings(encoder={"arch": ARCH})
    encoder = InProcessEncoder(settings)
    emb = encoder.embed(split.fit)
    fitted_path, _ = fit_and_save(
        Reference(emb, {"study": "image"}),
        encoder.describe(),
        tmp_path_factory.mktemp("detector") / "lite0.safetensors",
        kind="mahalanobis",
        components=8,
        groups=split.fit_groups,
    )
    return fitted_path, encoder


@pytest.fixture(scope="module")
def anomaly_stack(fitted, tmp_path_factory) -> Iterator[LocalStack]:
    settings = load_settings(encoder={"arch": ARCH, "detector": str(fitted[0])})
    with LocalStack(settings, workdir=tmp_path_factory.mktemp("anomaly-stack"), partitions=2) as stack:
        yield stack


def test_served_anomaly_columns_tell_unseen_photos_from_out_of_distribution_images(
    anomaly_stack, split, fitted, tmp_path
):
    lane = private_topics(anomaly_stack.settings, "anomaly", partitions=2)
    messages = [(f"normal-{i:03d}".encode(), v) for i, v in enumerate(split.normal)]
    messages += [(f"ood-{name}".encode(), v) for name, v in zip(split.ood_names, split.ood, strict=True)]
    produce(lane.kafka.bootstrap_servers, lane.kafka.input_topic, messages)
    worker = WorkerProcess(lane, tmp_path, "worker").start()
    try:
        result = read_all(lane, len(messages), timeout_s=240)
    finally:
        worker.terminate()
    assert not result.dead_letters, [(d.key, d.reason) for d in result.dead_letters]
    table = result.table()
    assert table.num_rows == len(messages)
    keys = [k.decode() for k in table.column("key").to_pylist()]
    scores = np.asarray(table.column("anomaly_score").to_pylist(), np.float64)
    flags = np.asarray(table.column("anomaly").to_pylist(), bool)
    det = detector.load(fitted[0])
    np.testing.assert_array_equal(flags, scores > det.side.threshold)
    # Triton's score is the one the fit computes on the rows' own embeddings.
    np.testing.assert_allclose(scores, det.score(embeddings_matrix(table)), rtol=1e-3, atol=1e-4)

    normal = np.array([k.startswith("normal-") for k in keys])
    near = np.array([k.startswith("ood-") and k[4:].rsplit("-", 1)[0] in NEAR_OOD for k in keys])
    far = ~normal & ~near
    auc_all, auc_far = roc_auc(scores[normal], scores[~normal]), roc_auc(scores[normal], scores[far])
    precision, recall = precision_recall(flags[normal], flags[~normal])
    print(
        f"\nserved detector: ROC-AUC {auc_all:.3f} (all OOD), {auc_far:.3f} (far OOD), "
        f"{roc_auc(scores[normal], scores[near]):.3f} (microscopy/retina); at the threshold precision "
        f"{precision:.3f}, recall {recall:.3f}, normal flagged {flags[normal].mean():.3f}"
    )
    assert auc_far >= MIN_AUC, f"unseen photos vs textures/drawings/synthetic: ROC-AUC {auc_far:.3f} < {MIN_AUC}"
    assert precision >= 0.9 and flags[normal].mean() <= 0.1, (precision, flags[normal].mean())

    # The same output topic as a normal reference (embedstream train detector --topic): every row, as published.
    reference, encoder = reference_from_topic(lane, lane.kafka.output_topic)
    assert (
        encoder["name"] == f"image-{ARCH}"
        and encoder["weights_sha256"] == table.schema.metadata[b"embedstream.weights_sha256"].decode()
    )
    assert len(reference.embeddings) == len(messages)
    # An offset range: the first message of each partition (the embedded broker may report a partition's
    # end late, and then reading it ends early: one message or two).
    first, _ = reference_from_topic(lane, lane.kafka.output_topic, start_offset=0, end_offset=1)
    assert 0 < len(first.embeddings) < len(messages) and first.source["messages"] in (1, 2)

    # The command, as an operator runs it, on the whole topic.
    out = tmp_path / "from-topic.safetensors"
    args = ["train", "detector", "--topic", lane.kafka.output_topic, "--bootstrap", lane.kafka.bootstrap_servers]
    assert cli_main([*args, "--kind", "knn", "--out", str(out), "--no-progress"]) == 0
    side = detector.load(out).side
    assert side.kind == "knn" and side.reference_rows + side.holdout_rows == len(messages)
    assert side.training["reference"]["topic"] == lane.kafka.output_topic and side.encoder["name"] == f"image-{ARCH}"
