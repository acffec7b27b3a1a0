"""Render a Triton ``config.pbtxt`` from an encoder spec."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

from embedstream.encoders import EncoderSpec

Backend = Literal["python", "pytorch", "onnxruntime"]
Kind = Literal["cpu", "gpu"]
Artifact = Literal["torchscript", "onnx"]
Precision = Literal["fp32", "fp16"]
OnnxExporter = Literal["torchscript", "dynamo"]


@dataclass(frozen=True)
class ExportTarget:
    """Where the exported model will run.

    ``python`` serves the exported file through Triton's Python backend (the local CPU server
    from PyPI ships only that backend; it also runs on GPU): the TorchScript ``model.pt``, or with
    ``artifact="onnx"`` the ``model.onnx`` run by ONNX Runtime inside the backend. ``pytorch`` is the
    libtorch backend of the stock ``nvcr.io/nvidia/tritonserver`` image, loading the same ``model.pt``.
    ``onnxruntime`` is the stock image's ONNX Runtime backend, loading ``model.onnx``; on GPU
    ``precision`` turns on its TensorRT execution provider at that precision.
    """

    backend: Backend = "python"
    kind: Kind = "cpu"
    instances: int = 1
    torch_threads: int = 2
    # The worker sends whole micro-batches: holding one back hoping for a preferred size only adds
    # latency. Requests that queue while the instance is busy (several workers) are still merged.
    max_queue_delay_us: int = 0
    artifact: Artifact = "torchscript"
    precision: Precision | None = None
    # Which torch exporter writes model.onnx; None: the family's faster one (export/onnx.py, docs/models.md).
    onnx_exporter: OnnxExporter | None = None
    # Where TensorRT keeps the engines it builds, so a restart loads them instead of rebuilding for minutes.
    tensorrt_cache: str = "/tmp/embedstream-trt-cache"

    def __post_init__(self) -> None:
        if self.backend == "onnxruntime" and self.artifact != "onnx":
            object.__setattr__(self, "artifact", "onnx")
        if self.backend == "pytorch" and self.artifact != "torchscript":
            raise ValueError("the pytorch backend loads TorchScript: use the onnxruntime backend for ONNX")
        if self.precision is not None and (self.backend != "onnxruntime" or self.kind != "gpu"):
            raise ValueError("precision selects TensorRT, which only the onnxruntime backend on GPU has")


# What the embedded stack (``embedstream up``/``demo``/``bench`` and the tests) serves: ``onnx`` (the
# default: ONNX Runtime ran Lite0 4x and MiniLM 1.4x faster than TorchScript here) or ``torchscript``.
LOCAL_ARTIFACT_ENV = "EMBEDSTREAM_LOCAL_ARTIFACT"


def local_artifact() -> Artifact:
    value = os.environ.get(LOCAL_ARTIFACT_ENV, "onnx")
    if value not in ("torchscript", "onnx"):
        raise ValueError(f"{LOCAL_ARTIFACT_ENV}={value!r}: choose torchscript or onnx")
    return "onnx" if value == "onnx" else "torchscript"


def local_cpu_target(cpus: int | None = None, artifact: Artifact | None = None) -> ExportTarget:
    """The embedded stack's Triton, on the cores it shares with the worker and the broker.

    Two single-threaded instances rather than one with two threads: on 2 shared cores an
    intra-op thread pool stalls whenever one of its threads is preempted (a batch of 8 took 4x its
    solo time beside a busy worker), while two instances run two batches side by side; MobileNet
    and MiniLM served 1.3x and 1.4x more per second that way here. ``artifact="onnx"`` serves the
    ONNX file with ONNX Runtime in the same backend, with the same instances and threads; unset, it
    is :data:`LOCAL_ARTIFACT_ENV` or ONNX.
    """
    cpus = cpus or os.cpu_count() or 1
    instances = min(2, cpus)
    return ExportTarget(
        instances=instances, torch_threads=max(1, cpus // instances), artifact=artifact or local_artifact()
    )


def _preferred_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (8, 16, 32, 64, 128) if s <= max_batch]
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sizes[-2:]


def _tensor_block(kind: str, tensors: tuple) -> str:
    items = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t.dims)
        items.append(f'  {{\n    name: "{t.name}"\n    data_type: TYPE_{t.dtype}\n    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def _param(key: str, value: str) -> str:
    # json.dumps yields a double-quoted string whose escapes protobuf text format also accepts.
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value)} }}\n}}'


def _tensorrt_block(target: ExportTarget) -> str:
    # Triton onnxruntime_backend: TensorRT as the GPU execution accelerator; nodes TensorRT cannot take
    # stay on ONNX Runtime's CUDA provider. The engine is built at load for the shapes seen, then cached.
    params = {
        "precision_mode": (target.precision or "fp32").upper(),
        "max_workspace_size_bytes": str(1 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": target.tensorrt_cache,
    }
    body = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [\n      {\n"
        f'        name : "tensorrt"\n{body}\n      }}\n    ]\n  }}\n}}'
    )


def render_config(spec: EncoderSpec, target: ExportTarget, onnx_sha256: str | None = None) -> str:
    """The config; ``onnx_sha256`` (the exported file's) lets the Python backend refuse a swapped ``model.onnx``."""
    lines = [
        f'name: "{spec.name}"',
        f'backend: "{target.backend}"',
        f"max_batch_size: {spec.max_batch_size}",
        _tensor_block("input", spec.inputs),
        _tensor_block("output", spec.outputs),
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(s) for s in _preferred_sizes(spec.max_batch_size))} ]\n"
        f"  max_queue_delay_microseconds: {target.max_queue_delay_us}\n"
        "}",
        f"instance_group [\n  {{\n    count: {target.instances}\n    kind: KIND_{target.kind.upper()}\n  }}\n]",
        "version_policy: { latest { num_versions: 1 } }",
        _param("embedstream.spec", spec.to_json().decode()),
        _param("torch_num_threads", str(target.torch_threads)),
    ]
    if onnx_sha256 is not None:
        lines.append(_param("embedstream.onnx_sha256", onnx_sha256))
    if target.backend == "pytorch":
        lines.append(_param("INFERENCE_MODE", "true"))
    if target.backend == "onnxruntime":
        lines.insert(3, 'default_model_filename: "model.onnx"')
        # 0 lets ONNX Runtime size its pool to the cores; a CPU instance gets the configured threads.
        threads = target.torch_threads if target.kind == "cpu" else 0
        lines.append(_param("intra_op_thread_count", str(threads)))
        lines.append(_param("inter_op_thread_count", "1"))
        if target.precision is not None:
            lines.append(_tensorrt_block(target))
    return "\n".join(lines) + "\n"
