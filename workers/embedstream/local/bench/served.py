"""The bare model in the runtimes it can be served with: the exported TorchScript file and ONNX Runtime.

``bare`` times the eager torch module; the pipeline, though, runs what the stack exported. These
load that artifact (or, for ONNX when the stack serves TorchScript, export one beside it) so that
pipeline / bare compares the pipeline with the same runtime on the same batches.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from embedstream.config import Settings
from embedstream.encoders import EncoderSpec, get_family
from embedstream.export.model_repository import MODEL_FILE, TRITON_VERSION_DIR
from embedstream.inference.local import TorchBackend
from embedstream.local.bench.stages import InProcessModel, ModelFactory
from embedstream.service import encoder_spec

Runtime = Literal["torchscript", "onnxruntime"]
ONNX_FILE = "model.onnx"


def onnx_available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter are installed (the ``models`` extra)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    try:
        from embedstream.export import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def served_runtime(model_dir: Path) -> Runtime:
    """What Triton runs for the model exported to ``model_dir``: ONNX Runtime when its config says
    so (the onnxruntime backend, or the Python backend told to run the ONNX file) or when only an
    ONNX file was exported; otherwise the TorchScript ``model.pt``."""
    config = model_dir / "config.pbtxt"
    version = model_dir / TRITON_VERSION_DIR
    has_onnx = (version / ONNX_FILE).exists()
    if has_onnx and (not (version / MODEL_FILE).exists() or (config.exists() and "onnx" in config.read_text())):
        return "onnxruntime"
    return "torchscript"


def torchscript_file(settings: Settings, model_dir: Path, workdir: Path) -> Path:
    """The served ``model.pt`` if the stack exported one, else one traced for the bench under ``workdir``."""
    served = model_dir / TRITON_VERSION_DIR / MODEL_FILE
    if served.exists():
        return served
    from embedstream.export import export_model, local_cpu_target

    repo = workdir / "bench-torchscript"
    spec = export_model(settings.encoder, repo, local_cpu_target(artifact="torchscript"))
    return repo / spec.name / TRITON_VERSION_DIR / MODEL_FILE


def torchscript_model(path: Path, spec: EncoderSpec) -> ModelFactory:
    """The TorchScript file loaded once; torch's threads are set by the caller."""
    with warnings.catch_warnings():
        # torch marks TorchScript as deprecated; it is still what Triton's libtorch backend loads.
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    backend = TorchBackend(spec, module)
    return lambda _threads: backend


class OnnxModel:
    """One ONNX Runtime session; ``run`` releases the GIL, so instance threads may share it."""

    def __init__(self, path: Path, spec: EncoderSpec, threads: int) -> None:
        from embedstream.export.onnx import onnx_session

        self._session = onnx_session(path, threads)
        self._inputs = [t.name for t in spec.inputs]
        self._outputs = [t.name for t in spec.outputs]

    def infer(self, inputs: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        feeds = {n: np.ascontiguousarray(a) for n, a in zip(self._inputs, inputs, strict=True)}
        got = self._session.run(self._outputs, feeds)
        return dict(zip(self._outputs, got, strict=True))


def onnx_file(settings: Settings, model_dir: Path, example: tuple[np.ndarray, ...], workdir: Path) -> Path:
    """The served ONNX file if the stack exported one, else one exported (and checked) under ``workdir``."""
    served = model_dir / TRITON_VERSION_DIR / ONNX_FILE
    if served.exists():
        return served
    from embedstream.export.onnx import export_onnx

    spec = encoder_spec(settings)
    path = workdir / "bench-onnx" / spec.name / ONNX_FILE
    module = get_family(settings.encoder.family).build(settings.encoder).eval()
    export_onnx(module, tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example), spec, path)
    return path


def onnx_model(path: Path, spec: EncoderSpec) -> ModelFactory:
    def make(threads: int) -> InProcessModel:
        return OnnxModel(path, spec, threads)

    return make
