"""The embedding-space anomaly detector: fit, served head, export with an encoder, the output columns, the CLI."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from embedstream import anomaly as detector
from embedstream.cli import main as cli_main
from embedstream.config import EncoderSettings, load_settings
from embedstream.encoders import get_family
from embedstream.errors import ConfigError
from embedstream.export import ExportTarget, export_model
from embedstream.export.onnx import ONNX_FILE, onnx_session
from embedstream.lineage import module_fingerprint
from embedstream.modalities.image import ImageModality
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.testing import FakeBackend, FakeConsumer, FakeProducer
from embedstream.training.detector import precision_recall, roc_auc
from embedstream.worker import Worker

from .test_encoders_and_export import SMALL
from .test_worker_loop import SPEC, png, run_until_drained

DIM = 24


def cluster(n, seed=0, dim=DIM, rank=4):
    """Normal rows: a low-rank cloud around one direction (as encoder embeddings of one domain are)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(rank, dim))
    centre = np.random.default_rng(98).normal(size=dim) * 3
    return (centre + rng.normal(size=(n, rank)) @ basis + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("kind", detector.KINDS)
def test_the_served_head_scores_as_the_fit_and_outliers_score_above_normal_rows(kind):
    fitted = detector.fit(kind, cluster(300), quantile=0.95, components=4, k=5)
    normal, outliers = cluster(100, seed=1), np.random.default_rng(2).normal(size=(100, DIM)).astype(np.float32)
    s_normal, s_out = fitted.score(normal), fitted.score(outliers)
    assert roc_auc(s_normal, s_out) > 0.99
    t = fitted.side.threshold
    assert np.mean(s_normal > t) < 0.15 and np.mean(s_out > t) > 0.9
    with torch.inference_mode():
        score, flag = detector.head(fitted)(torch.from_numpy(np.concatenate([normal, outliers])))
    assert score.shape == flag.shape == (200, 1) and flag.dtype == torch.bool
    np.testing.assert_allclose(score[:, 0].numpy(), np.concatenate([s_normal, s_out]), rtol=1e-4, atol=1e-5)
    # Exact: the flag is the served score against the FP32 threshold the head stores, in the same graph.
    np.testing.assert_array_equal(flag[:, 0].numpy(), score[:, 0].numpy() > np.float32(t))


def test_the_group_hold_out_keeps_whole_groups_out_of_the_reference():
    x = cluster(200)
    groups = np.repeat(np.arange(20), 10)
    fitted = detector.fit("knn", x, groups=groups, holdout=0.2, k=1)
    assert fitted.side.holdout_rows == 40 and fitted.side.reference_rows == 160
    assert fitted.side.training["holdout_by"] == "group"
    ref = fitted.tensors["reference"]
    nearest = np.abs(detector.normalise(x)[:, None, :] - ref[None]).max(axis=2).min(axis=1)
    in_ref = nearest < 1e-6
    per_group = {g: set(in_ref[groups == g].tolist()) for g in range(20)}
    assert all(len(v) == 1 for v in per_group.values()), "each group wholly in the reference or wholly out"
    assert sum(v == {False} for v in per_group.values()) == 4
    with pytest.raises(ConfigError, match="group labels"):
        detector.fit("knn", x, groups=groups[:10])


def test_save_and_load_round_trip_and_refusals(tmp_path):
    fitted = detector.fit("mahalanobis", cluster(100), components=3)
    path = detector.save(fitted, tmp_path / "d")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    back = detector.load(path)
    assert back.side == fitted.side
    # What the round trip promises exactly: the stored tensors, byte for byte, with dtype and shape.
    assert set(back.tensors) == set(fitted.tensors)
    for name, t in fitted.tensors.items():
        got = back.tensors[name]
        assert (got.dtype, got.shape) == (t.dtype, t.shape), name
        assert got.tobytes() == np.ascontiguousarray(t).tobytes(), name
    # Scores from those tensors are the same float64 arithmetic, but BLAS picks its kernel by CPU and
    # memory layout, so the last bits may differ (2.8e-17 seen on one Xeon): a relative 1e-12 is
    # ~4,500 float64 ulps, far below any threshold decision and far above such reordering.
    rows = cluster(5, seed=3)
    np.testing.assert_allclose(back.score(rows), fitted.score(rows), rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match=r"must be a \.safetensors"):
        detector.load(tmp_path / "d.json")
    with pytest.raises(ConfigError, match="not found"):
        detector.load(tmp_path / "missing.safetensors")
    side = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**side, "kind": "knn"}))
    with pytest.raises(ConfigError, match="a knn detector holds"):
        detector.load(path)


def test_a_detector_of_another_dimension_or_on_the_autoencoder_is_refused():
    fitted = detector.fit("mahalanobis", cluster(50, dim=8))
    cnn = get_family("cnn").describe(SMALL["cnn"])
    with pytest.raises(ConfigError, match="fitted on 8-d embeddings"):
        detector.with_detector_spec(cnn, fitted)
    ae = get_family("autoencoder").describe(SMALL["autoencoder"])
    with pytest.raises(ConfigError, match="already returns an anomaly flag"):
        detector.with_detector_spec(ae, detector.fit("mahalanobis", cluster(50, dim=ae.embedding_dim)))


def test_roc_auc_and_precision_recall():
    assert roc_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert roc_auc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert roc_auc(np.array([0.1, 0.5]), np.array([0.5, 0.2])) == pytest.approx(0.625)  # 1 + 0.5 ties + 1 of 4
    assert precision_recall(np.array([True, False]), np.array([True, True, False, False])) == (2 / 3, 0.5)


def _random_pixels(n, spec, seed=0):
    h, w, c = spec.inputs[0].dims
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8))


@pytest.fixture(scope="module")
def cnn_detector(tmp_path_factory):
    """A detector fitted on the small CNN's own embeddings of random images, saved."""
    fam = get_family("cnn")
    settings = SMALL["cnn"]
    spec, module = fam.describe(settings), fam.build(settings).eval()
    with torch.inference_mode():
        emb = module(_random_pixels(40, spec)).numpy()
    return detector.save(detector.fit("mahalanobis", emb, components=8), tmp_path_factory.mktemp("det") / "cnn")


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["onnx", "torchscript"])
def test_export_serves_the_detector_outputs_and_the_fingerprint_covers_them(cnn_detector, tmp_path, artifact):
    settings = SMALL["cnn"].model_copy(update={"detector": str(cnn_detector)})
    target = ExportTarget(artifact=artifact, onnx_exporter="torchscript")
    spec = export_model(settings, tmp_path / "with", target)
    assert [(o.name, o.dtype, o.column) for o in spec.outputs[1:]] == [
        ("anomaly_score__1", "FP32", "anomaly_score"),
        ("anomaly__2", "BOOL", "anomaly"),
    ]
    fitted = detector.load(cnn_detector)
    assert spec.extra["detector"]["threshold"] == fitted.side.threshold
    module = get_family("cnn").build(SMALL["cnn"]).eval()
    # The served module's tensors, the detector's included: the bare encoder and another threshold differ.
    moved = detector.Fitted(fitted.tensors, type(fitted.side)(**{**fitted.side.__dict__, "threshold": 0.5}))
    assert spec.weights_sha256 == module_fingerprint(detector.wrap(module, fitted))
    assert spec.weights_sha256 not in (module_fingerprint(module), module_fingerprint(detector.wrap(module, moved)))
    pixels = _random_pixels(3, spec, seed=5)
    with torch.inference_mode():
        want = fitted.score(module(pixels).numpy())
    version_dir = tmp_path / "with" / spec.name / "1"
    if artifact == "onnx":
        emb, score, flag = onnx_session(version_dir / ONNX_FILE, threads=1).run(None, {"pixels__0": pixels.numpy()})
    else:
        served = torch.jit.load(str(version_dir / "model.pt"))
        with torch.inference_mode():
            emb, score, flag = (t.numpy() for t in served(pixels))
        assert spec.weights_sha256 == module_fingerprint(served)
    assert emb.shape == (3, spec.embedding_dim) and score.shape == flag.shape == (3, 1) and flag.dtype == np.bool_
    np.testing.assert_allclose(score[:, 0], want, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(flag[:, 0], score[:, 0] > np.float32(fitted.side.threshold))


@pytest.mark.slow
def test_a_text_encoder_exports_with_a_detector(tmp_path):
    fam = get_family("transformer")
    settings = SMALL["transformer"]
    spec = fam.describe(settings)
    fitted = detector.fit("knn", cluster(30, dim=spec.embedding_dim), k=3)
    path = detector.save(fitted, tmp_path / "text")
    served = export_model(
        settings.model_copy(update={"detector": str(path)}), tmp_path / "repo", ExportTarget(artifact="onnx")
    )
    assert [o.column for o in served.outputs] == [None, "anomaly_score", "anomaly"]
    session = onnx_session(tmp_path / "repo" / served.name / "1" / ONNX_FILE, threads=1)
    ids, mask = (t.numpy() for t in fam.example_inputs(spec, 2))
    emb, score, _ = session.run(None, dict(zip([t.name for t in spec.inputs], (ids, mask), strict=True)))
    np.testing.assert_allclose(score[:, 0], fitted.score(emb), rtol=1e-3, atol=1e-4)


class DetectorBackend(FakeBackend):
    """FakeBackend's embeddings, then the detector's two outputs, as the exported model returns them."""

    def __init__(self, spec, fitted):
        super().__init__(spec)
        self.fitted = fitted

    def infer(self, inputs):
        out = super().infer(inputs)
        score = self.fitted.score(out["embedding__0"]).astype(np.float32)[:, None]
        return {**out, "anomaly_score__1": score, "anomaly__2": score > self.fitted.side.threshold}


def test_the_worker_writes_the_anomaly_columns_only_when_a_detector_is_served():
    grey = [np.full(6, v, np.float32) + np.random.default_rng(v).normal(0, 0.01, 6) for v in range(60, 200)]
    fitted = detector.fit("knn", np.stack(grey), k=3)
    spec = detector.with_detector_spec(SPEC, fitted)
    settings = load_settings(batch={"max_size": 4, "max_wait_ms": 0}, commit_interval_ms=0, worker_id="w")

    def run(spec, backend):
        colour = io.BytesIO()
        Image.new("RGB", (20, 16), (250, 10, 10)).save(colour, format="PNG")
        consumer = FakeConsumer({0: [(b"grey", png(120)), (b"red", colour.getvalue())]})
        producer = FakeProducer()
        worker = Worker(settings, ImageModality(spec, settings), backend, consumer, producer)
        run_until_drained(worker, consumer)
        return [decode_embeddings(v) for _, v, _ in producer.sent["embeddings.image"]]

    (table,) = run(spec, DetectorBackend(spec, fitted))
    assert [str(table.schema.field(c).type) for c in ("anomaly_score", "anomaly")] == ["float", "bool"]
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows[b"grey"]["anomaly"] is False and rows[b"red"]["anomaly"] is True
    assert rows[b"red"]["anomaly_score"] > fitted.side.threshold > rows[b"grey"]["anomaly_score"]
    (plain,) = run(SPEC, FakeBackend(SPEC))
    assert "anomaly_score" not in plain.column_names and "anomaly" not in plain.column_names


@pytest.mark.slow
def test_train_detector_from_a_folder_of_images(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    config = tmp_path / "worker.toml"
    config.write_text('[encoder]\nfamily = "cnn"\narch = "mobilenetv3_small_050"\nweights = "random"\n')
    out = tmp_path / "weights"
    args = ["train", "detector", "--config", str(config), "--data", str(folder), "--out", str(out), "--no-progress"]
    assert cli_main([*args, "--components", "4"]) == 0
    printed = capsys.readouterr().out
    (path,) = out.glob("*.safetensors")
    assert path.name == "detector-image-mobilenetv3_small_050.safetensors" and f'detector = "{path}"' in printed
    fitted = detector.load(path)
    assert fitted.side.reference_rows + fitted.side.holdout_rows == 24 and fitted.side.components == 4
    assert fitted.side.encoder["name"] == "image-mobilenetv3_small_050"
    assert fitted.side.training["reference"] == {"files": str(folder), "rows": 24}
    # The encoder it was fitted for exports with it.
    spec = export_model(
        EncoderSettings(family="cnn", arch="mobilenetv3_small_050", weights="random", detector=str(path)),
        tmp_path / "repo",
        ExportTarget(artifact="torchscript"),
    )
    assert spec.outputs[-1].column == "anomaly"


def test_train_detector_refusals(tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("a sentence\n")
    assert cli_main(["train", "detector", "--no-progress"]) == 2  # neither --data nor --topic
    assert cli_main(["train", "detector", "--data", str(text), "--topic", "t", "--no-progress"]) == 2


@pytest.mark.parametrize("modality", ["image", "text"])
def test_the_output_schema_has_the_contract_anomaly_columns_only_with_a_detector(modality):
    import pyarrow as pa

    from embedstream.sinks.arrow_codec import model_field, output_schema

    from .test_contracts import load

    contract = load("embedding.arrow.json")["model_fields"]["detector"]
    spec = detector.with_detector_spec(
        dataclasses.replace(SPEC, modality=modality), detector.fit("knn", cluster(20, dim=SPEC.embedding_dim))
    )
    fields = [model_field(o.column, o.dtype) for o in spec.outputs[1:] if o.column]
    schema = output_schema(modality, spec.name, spec.version, spec.embedding_dim, fields)
    names = schema.names
    assert names[-3:] == ["anomaly_score", "anomaly", "embedding"]
    assert [(f.name, str(f.type), f.nullable) for f in schema][-3:-1] == [
        (c["name"], c["type"], c["nullable"]) for c in contract
    ]
    plain = output_schema(modality, SPEC.name, SPEC.version, SPEC.embedding_dim)
    assert "anomaly_score" not in plain.names and isinstance(plain, pa.Schema)
