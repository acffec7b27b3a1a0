"""The ONNX artifact: every family exports, ONNX Runtime reproduces torch eager, Triton configs parse."""

import json
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from embedstream.config import EncoderSettings
from embedstream.encoders import EncoderSpec, get_family, list_families
from embedstream.errors import ModelMismatchError
from embedstream.export import ExportTarget, export_model, render_config
from embedstream.export.onnx import CHECK_FILE, ONNX_FILE, export_onnx, onnx_session
from embedstream.lineage import weights_fingerprint

from .test_encoders_and_export import SMALL
from .test_lineage import initialize_args, python_backend_model


@pytest.fixture(params=list_families())
def family_settings(request) -> EncoderSettings:
    if request.param not in SMALL:
        pytest.fail(f"encoder family {request.param!r} has no small test setting in SMALL")
    return SMALL[request.param]


def _outputs(x: Any) -> list[np.ndarray]:
    items = [x] if isinstance(x, torch.Tensor) else list(x)
    return [t.float().numpy() for t in items]


def _feed(spec: EncoderSpec, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_runtime_reproduces_the_module_at_any_batch_size(family_settings, tmp_path, batch):
    fam = get_family(family_settings.family)
    spec = fam.describe(family_settings)
    module = fam.build(family_settings)
    # The tracer's export, seconds for every family; the dynamo one is checked per family below.
    check = export_onnx(module, fam.example_inputs(spec, 2), spec, tmp_path / ONNX_FILE, exporter="torchscript")
    assert check.exporter == "torchscript" and check.max_abs_diff < 1e-4 and check.min_cosine > 0.9999

    session = onnx_session(tmp_path / ONNX_FILE, threads=1)
    assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
    assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
    inputs = fam.example_inputs(spec, batch)
    with torch.inference_mode():
        want = _outputs(module(*inputs))
    got = session.run(None, _feed(spec, inputs))
    assert got[0].shape == (batch, spec.embedding_dim)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, dtype=np.float32), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("length", [5, 61])
def test_text_onnx_takes_any_sequence_length(tmp_path, length, exporter):
    settings = SMALL["transformer"]
    fam = get_family("transformer")
    spec = fam.describe(settings)
    module = fam.build(settings)
    export_onnx(module, fam.example_inputs(spec, 2), spec, tmp_path / ONNX_FILE, exporter=exporter)
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(1000, 20000, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.int64)
    mask[1, length // 2 :] = 0  # one padded row: mean pooling must skip its padding
    with torch.inference_mode():
        want = module(ids, mask).numpy()
    got = onnx_session(tmp_path / ONNX_FILE, threads=1).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # L2 norm is inside the graph


def test_a_graph_that_differs_from_the_module_is_refused(tmp_path):
    settings = SMALL["lstm"]
    fam = get_family("lstm")
    spec = fam.describe(settings)
    module = fam.build(settings)

    class Drifting(torch.nn.Module):
        """Exports one thing and runs another eagerly: what a wrong export looks like to the check."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            return out if torch.jit.is_tracing() else out + 0.1

    with pytest.raises(ModelMismatchError, match="differs from torch eager"):
        export_onnx(Drifting(), fam.example_inputs(spec, 2), spec, tmp_path / ONNX_FILE)


def test_an_input_the_graph_drops_is_refused_and_the_null_text_encoder_keeps_both(tmp_path):
    """The TorchScript-based exporter drops inputs a graph never reads: a text model without its
    attention mask would be served taking one tensor while the worker sends two."""
    null = EncoderSettings(family="null", arch="transformer/all-MiniLM-L6-v2", max_batch_size=16)
    fam = get_family("null")
    spec = fam.describe(null)
    assert [t.name for t in spec.inputs] == ["input_ids", "attention_mask"]
    example = fam.example_inputs(spec, 2)
    check = export_onnx(fam.build(null), example, spec, tmp_path / "null" / ONNX_FILE)  # the family's exporter
    assert check.max_abs_diff == 0.0
    names = [i.name for i in onnx_session(tmp_path / "null" / ONNX_FILE, threads=1).get_inputs()]
    assert names == ["input_ids", "attention_mask"]

    class IgnoresTheMask(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return torch.zeros(input_ids.shape[0], spec.embedding_dim) + 0.0 * input_ids[:, :1]

    with pytest.raises(ModelMismatchError, match=r"takes \['input_ids'\], the spec \['input_ids', 'attention_mask'\]"):
        export_onnx(IgnoresTheMask(), example, spec, tmp_path / "bad" / ONNX_FILE, exporter="torchscript")


def test_the_onnx_repository_records_its_check_and_the_same_lineage(family_settings, tmp_path):
    onnx_spec = export_model(family_settings, tmp_path / "onnx", ExportTarget(artifact="onnx"))
    version = tmp_path / "onnx" / onnx_spec.name / "1"
    assert (version / ONNX_FILE).is_file() and not (version / "model.pt").exists()
    assert (version / "model.py").is_file()
    check = json.loads((version / CHECK_FILE).read_text())
    assert check["max_abs_diff"] < 1e-4 and check["min_cosine"] > 0.9999
    # The same weights name the same fingerprint whichever file serves them.
    ts_spec = export_model(family_settings, tmp_path / "ts")
    assert onnx_spec.weights_sha256 == ts_spec.weights_sha256
    assert onnx_spec.preprocessing_sha256 == ts_spec.preprocessing_sha256
    cfg = text_format.Parse((version.parent / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.backend == "python"
    assert cfg.parameters["embedstream.onnx_sha256"].string_value == check["onnx_sha256"]


@pytest.mark.slow
def test_the_python_backend_serves_the_onnx_file_and_refuses_a_swapped_one(tmp_path):
    backend = python_backend_model()
    settings = SMALL["cnn"]
    # The tracer's export: seconds rather than dynamo's tens, and the backend cannot tell them apart.
    target = ExportTarget(artifact="onnx", onnx_exporter="torchscript")
    spec = export_model(settings, tmp_path / "a", target)
    served = backend.TritonPythonModel()
    served.initialize(initialize_args(spec, tmp_path / "a"))
    assert served.session is not None  # ONNX Runtime, not TorchScript
    fam = get_family("cnn")
    inputs = fam.example_inputs(spec, 3)
    with torch.inference_mode():
        want = fam.build(settings)(*inputs).numpy()
    np.testing.assert_allclose(served._run([inputs[0].numpy()])[0], want, rtol=1e-4, atol=1e-4)
    assert spec.weights_sha256 == weights_fingerprint(fam.build(settings).state_dict())

    other = export_model(settings.model_copy(update={"seed": 5}), tmp_path / "b", target)
    shutil.copy(tmp_path / "b" / other.name / "1" / ONNX_FILE, tmp_path / "a" / spec.name / "1" / ONNX_FILE)
    with pytest.raises(RuntimeError, match="replaced after export"):
        backend.TritonPythonModel().initialize(initialize_args(spec, tmp_path / "a"))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
@pytest.mark.parametrize("precision", [None, "fp32", "fp16"])
def test_the_onnxruntime_backend_config_parses_and_names_tensorrt(family_settings, kind, precision):
    if precision is not None and kind == "cpu":
        with pytest.raises(ValueError, match="TensorRT"):
            ExportTarget(backend="onnxruntime", kind=kind, precision=precision)
        return
    target = ExportTarget(backend="onnxruntime", kind=kind, precision=precision, instances=2)
    assert target.artifact == "onnx"
    spec = get_family(family_settings.family).describe(family_settings)
    cfg = text_format.Parse(render_config(spec, target, "ab" * 32), model_config_pb2.ModelConfig())
    assert cfg.backend == "onnxruntime" and cfg.default_model_filename == "model.onnx"
    assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
    assert [o.name for o in cfg.output] == [t.name for t in spec.outputs]
    assert cfg.max_batch_size == spec.max_batch_size and cfg.dynamic_batching.preferred_batch_size
    group = cfg.instance_group[0]
    assert group.count == 2
    assert group.kind == getattr(model_config_pb2.ModelInstanceGroup, f"KIND_{kind.upper()}")
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    if precision is None:
        assert not accelerators
    else:
        assert [a.name for a in accelerators] == ["tensorrt"]
        assert accelerators[0].parameters["precision_mode"] == precision.upper()
    assert EncoderSpec.from_json(cfg.parameters["embedstream.spec"].string_value) == spec


def test_torchscript_cannot_go_to_the_onnxruntime_backend_nor_onnx_to_libtorch():
    with pytest.raises(ValueError, match="TorchScript"):
        ExportTarget(backend="pytorch", artifact="onnx")


@pytest.mark.slow
def test_the_torch_export_based_exporter_reproduces_every_family(family_settings, tmp_path):
    fam = get_family(family_settings.family)
    spec = fam.describe(family_settings)
    module = fam.build(family_settings)
    check = export_onnx(module, fam.example_inputs(spec, 2), spec, tmp_path / ONNX_FILE, exporter="dynamo")
    assert check.exporter == "dynamo" and check.max_abs_diff < 1e-4
    session = onnx_session(tmp_path / ONNX_FILE, threads=1)
    for batch in (1, 7):
        inputs = fam.example_inputs(spec, batch)
        with torch.inference_mode():
            want = _outputs(module(*inputs))
        for g, w in zip(session.run(None, _feed(spec, inputs)), want, strict=True):
            np.testing.assert_allclose(np.asarray(g, dtype=np.float32), w, rtol=1e-4, atol=1e-4)


def test_the_local_stack_serves_onnx_unless_torchscript_is_chosen(monkeypatch):
    from embedstream.export.triton_config import LOCAL_ARTIFACT_ENV, local_cpu_target

    monkeypatch.delenv(LOCAL_ARTIFACT_ENV, raising=False)
    assert local_cpu_target(2) == ExportTarget(instances=2, torch_threads=1, artifact="onnx")
    assert local_cpu_target(2, artifact="torchscript").artifact == "torchscript"
    monkeypatch.setenv(LOCAL_ARTIFACT_ENV, "torchscript")
    assert local_cpu_target(2).artifact == "torchscript"
    monkeypatch.setenv(LOCAL_ARTIFACT_ENV, "tensorrt")
    with pytest.raises(ValueError, match="torchscript or onnx"):
        local_cpu_target(2)


def test_each_family_gets_the_exporter_chosen_for_it_unless_one_is_named(tmp_path):
    cnn = export_model(SMALL["cnn"], tmp_path / "a", ExportTarget(artifact="onnx"))
    assert json.loads((tmp_path / "a" / cnn.name / "1" / CHECK_FILE).read_text())["exporter"] == "dynamo"
    lstm = export_model(SMALL["lstm"], tmp_path / "a", ExportTarget(artifact="onnx"))
    assert json.loads((tmp_path / "a" / lstm.name / "1" / CHECK_FILE).read_text())["exporter"] == "torchscript"
    named = ExportTarget(artifact="onnx", onnx_exporter="torchscript")
    export_model(SMALL["cnn"], tmp_path / "b", named)
    assert json.loads((tmp_path / "b" / cnn.name / "1" / CHECK_FILE).read_text())["exporter"] == "torchscript"
