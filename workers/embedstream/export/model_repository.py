"""Write ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/1/model.pt`` or ``model.onnx`` (+ ``model.py``).

The artifact is TorchScript or ONNX. TorchScript runs in Triton's Python backend (local, CPU or GPU)
and in the libtorch backend of a stock Triton image; ONNX runs with ONNX Runtime inside the same
Python backend and in the stock image's onnxruntime backend (with TensorRT on GPU). The ONNX export
is checked against torch eager; the figures land in ``1/onnx_check.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from embedstream import anomaly
from embedstream.config import EncoderSettings
from embedstream.encoders import EncoderSpec, get_family
from embedstream.errors import ModelMismatchError
from embedstream.export.triton_config import ExportTarget, render_config
from embedstream.lineage import module_fingerprint, preprocessing_fingerprint, weights_fingerprint

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
TRITON_VERSION_DIR = "1"


def export_model(settings: EncoderSettings, repo: Path, target: ExportTarget | None = None) -> EncoderSpec:
    target = target or ExportTarget()
    family = get_family(settings.family)
    spec = family.describe(settings)
    module = family.build(settings)
    # An embedding-space anomaly detector (encoder.detector) is served inside the encoder's model: its
    # score and flag follow the family's outputs, and its tensors are buffers of the exported module,
    # so both artifacts' weights fingerprint covers them.
    spec, module = anomaly.apply(spec, module, settings.detector)
    example = family.example_inputs(spec, 2)
    model_dir = Path(repo) / spec.name
    version_dir = model_dir / TRITON_VERSION_DIR
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    onnx_sha256 = None
    if target.artifact == "onnx":
        from embedstream.export.onnx import CHECK_FILE, ONNX_FILE, export_onnx

        # The ONNX graph holds the module's tensors as initialisers: the fingerprint is taken from the
        # module it was exported from, and the file's own sha256 guards it against a swap.
        check = export_onnx(module, example, spec, version_dir / ONNX_FILE, exporter=target.onnx_exporter)
        (version_dir / CHECK_FILE).write_text(check.to_json())
        onnx_sha256 = check.onnx_sha256
        weights_sha256 = module_fingerprint(module)
    else:
        scripted = _trace(module, example, spec)
        scripted.save(str(version_dir / MODEL_FILE))
        # Fingerprinted from the traced module, the artifact Triton loads, so the value names what is served.
        weights_sha256 = weights_fingerprint(scripted.state_dict())
    spec = dataclasses.replace(
        spec,
        weights_sha256=weights_sha256,
        preprocessing_sha256=preprocessing_fingerprint(spec),
    )
    if target.backend == "python":
        template = resources.files("embedstream.export").joinpath("triton_python_model.py")
        (version_dir / "model.py").write_text(template.read_text())
    (model_dir / "config.pbtxt").write_text(render_config(spec, target, onnx_sha256))
    (model_dir / "spec.json").write_bytes(spec.to_json())
    log.info(
        "exported %s (%s %s/%s) to %s: weights %s, preprocessing %s",
        spec.name,
        target.artifact,
        target.backend,
        target.kind,
        model_dir,
        spec.weights_sha256,
        spec.preprocessing_sha256,
    )
    return spec


def _trace(module: torch.nn.Module, example: tuple[torch.Tensor, ...], spec: EncoderSpec) -> torch.jit.ScriptModule:
    # Imported here: the local stack imports this package to export, and its importers (the CLI among
    # them) should not pay for torch until a model is actually traced.
    import torch

    with torch.inference_mode(), warnings.catch_warnings():
        # TorchScript is deprecated in torch but is what Triton's libtorch backend loads.
        warnings.simplefilter("ignore", FutureWarning)
        # Shape checks frozen by the trace (e.g. transformers' mask handling) are verified below and in tests.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        # A trace can silently bake in the example's batch size; run another size to be sure it did not.
        probe = tuple(torch.cat([t, t[:1]]) for t in example)
        out = traced(*probe)
        out = out[0] if isinstance(out, (tuple, list)) else out
    expected = (probe[0].shape[0], spec.embedding_dim)
    if tuple(out.shape) != expected:
        raise ModelMismatchError(f"traced {spec.name} returns {tuple(out.shape)} for a batch of 3, not {expected}")
    return traced
