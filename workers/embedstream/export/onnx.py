"""Export an encoder's served module to ONNX and check it against torch eager with ONNX Runtime.

The ONNX file is what ONNX Runtime serves: inside the local Triton's Python backend (CPU) and in the
stock Triton image's ``onnxruntime`` backend (CPU, GPU, with the TensorRT execution provider). It
takes and returns the same tensors, by the same names, as the TorchScript ``model.pt``: uint8 NHWC
pixels with normalisation inside for images, token ids and mask with mean pooling and L2 norm inside
for text, the autoencoder's extra outputs after the embedding.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from embedstream.encoders import EncoderSpec
from embedstream.errors import ModelMismatchError

if TYPE_CHECKING:
    import onnxruntime
    import torch

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
CHECK_FILE = "onnx_check.json"
OPSET = 17
# "torchscript": torch.onnx.export(..., dynamo=False), which traces; "dynamo": the torch.export-based
# exporter torch recommends. Both reproduce every family; their graphs run at different speeds in ONNX
# Runtime (1 thread, batch 32, same session options): EfficientNet-Lite0 97 images/s from dynamo's vs
# 66 from the tracer's, MiniLM 358 vs 429 sentences/s. Each family gets the faster one by default.
Exporter = Literal["torchscript", "dynamo"]
EXPORTER: Exporter = "torchscript"
FAMILY_EXPORTER: dict[str, Exporter] = {"cnn": "dynamo"}


def preferred_exporter(family: str) -> Exporter:
    """The exporter whose graph ONNX Runtime runs faster for ``family`` (measured above)."""
    return FAMILY_EXPORTER.get(family, EXPORTER)


# Float32 through a different kernel library: differences of a few 1e-5 are rounding, not a wrong graph.
MAX_ABS_DIFF = 1e-3
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class OnnxCheck:
    """How the exported file compares with torch eager on the same inputs (written beside the model)."""

    exporter: str
    opset: int
    max_abs_diff: float
    min_cosine: float
    batch_sizes: tuple[int, ...]
    onnx_sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def export_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    spec: EncoderSpec,
    path: Path,
    exporter: Exporter | None = None,
) -> OnnxCheck:
    """Write ``module`` to ``path`` as ONNX with a dynamic batch (and dynamic -1 dims) and check it.

    The check runs the file with ONNX Runtime on ``example`` and on a batch one row longer (so a batch
    size frozen into the graph fails here, not in serving) and compares every output with eager.
    Raises :class:`ModelMismatchError` when the file does not reproduce the module. ``exporter``
    unset: the family's (:func:`preferred_exporter`), the graph the model repository serves.
    """
    import torch

    from embedstream.lineage import file_sha256

    exporter = exporter or preferred_exporter(spec.family)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = [t.name for t in spec.inputs]
    output_names = [t.name for t in spec.outputs]
    dynamic_axes: dict[str, dict[int, str]] = {}
    for t in spec.inputs:
        axes = {0: "batch"}
        axes.update({i + 1: f"{t.name}_dim{i + 1}" for i, d in enumerate(t.dims) if d < 0})
        dynamic_axes[t.name] = axes
    for t in spec.outputs:
        dynamic_axes[t.name] = {0: "batch"}
    module = module.eval()
    if exporter == "dynamo":
        _export_dynamo(module, example, spec, path)
    else:
        with torch.inference_mode(), warnings.catch_warnings():
            # The TorchScript-based exporter traces: the same shape checks the TorchScript trace freezes
            # are re-verified below on a second batch size.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    probe = tuple(torch.cat([t, t[:1]]) for t in example)
    session = onnx_session(path, threads=1)
    graph_inputs = [i.name for i in session.get_inputs()]
    if graph_inputs != input_names:
        # The exporters drop inputs the graph never reads; the worker would send them and Triton refuse.
        raise ModelMismatchError(
            f"{spec.name}: the exported ONNX graph takes {graph_inputs}, the spec {input_names}; "
            "the module must use every input it declares"
        )
    worst_diff, worst_cos = 0.0, 1.0
    for inputs in (example, probe):
        diff, cos = _compare(module, session, inputs, input_names, spec)
        worst_diff, worst_cos = max(worst_diff, diff), min(worst_cos, cos)
    check = OnnxCheck(
        exporter=exporter,
        opset=OPSET,
        max_abs_diff=worst_diff,
        min_cosine=worst_cos,
        batch_sizes=(example[0].shape[0], probe[0].shape[0]),
        onnx_sha256=file_sha256(path),
    )
    log.info(
        "onnx export of %s: max abs diff %.2e, min cosine %.8f vs torch eager (%s exporter, opset %d)",
        spec.name,
        worst_diff,
        worst_cos,
        exporter,
        OPSET,
    )
    if worst_diff > MAX_ABS_DIFF or worst_cos < MIN_COSINE:
        raise ModelMismatchError(
            f"ONNX export of {spec.name} differs from torch eager: max abs diff {worst_diff:.3g} "
            f"(limit {MAX_ABS_DIFF}), min cosine {worst_cos:.6f} (limit {MIN_COSINE})"
        )
    return check


def _export_dynamo(module: torch.nn.Module, example: tuple[torch.Tensor, ...], spec: EncoderSpec, path: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=max(2, spec.max_batch_size))
    # One symbol per variable position, shared by the inputs: token ids and their mask have one length.
    free = {i: torch.export.Dim(f"dim{i}", min=1) for t in spec.inputs for i, d in enumerate(t.dims, 1) if d < 0}
    shapes = tuple({0: batch, **{i: free[i] for i, d in enumerate(t.dims, 1) if d < 0}} for t in spec.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=shapes,
            opset_version=max(OPSET, 18),
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def onnx_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and no inter-op pool."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _compare(
    module: torch.nn.Module,
    session: onnxruntime.InferenceSession,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    spec: EncoderSpec,
) -> tuple[float, float]:
    import numpy as np
    import torch

    with torch.inference_mode():
        want = module(*inputs)
    wants = [want] if isinstance(want, torch.Tensor) else list(want)
    gots = session.run(None, {n: t.numpy() for n, t in zip(input_names, inputs, strict=True)})
    if len(gots) != len(spec.outputs) or len(wants) != len(spec.outputs):
        raise ModelMismatchError(
            f"{spec.name}: ONNX returns {len(gots)} outputs, eager {len(wants)}, the spec names {len(spec.outputs)}"
        )
    diff, cos = 0.0, 1.0
    for got, w in zip(gots, wants, strict=True):
        w_np = w.float().numpy()
        got = np.asarray(got, dtype=np.float32)
        if got.shape != w_np.shape:
            raise ModelMismatchError(f"{spec.name}: ONNX output shape {got.shape}, eager {w_np.shape}")
        diff = max(diff, float(np.max(np.abs(got - w_np))) if got.size else 0.0)
    # Cosine per row of the embedding: the quantity the pipeline's consumers compare.
    g = np.asarray(gots[0], dtype=np.float64).reshape(len(gots[0]), -1)
    e = wants[0].double().numpy().reshape(len(g), -1)
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(e, axis=1)
    # A zero row (the null family) is identical when both are zero: count it as cosine 1.
    rows = np.where(norms > 0, np.sum(g * e, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    cos = float(np.min(rows)) if rows.size else 1.0
    return diff, cos
