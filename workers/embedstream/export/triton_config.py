"""Render a Triton ``config.pbtxt`` from an encoder spec."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

from embedstream.encoders import EncoderSpec

Backend = Literal["python", "pytorch"]
Kind = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class ExportTarget:
    """Where the exported model will run.

    ``python`` serves the TorchScript file through Triton's Python backend (the local CPU server
    from PyPI ships only that backend; it also runs on GPU). ``pytorch`` is the libtorch backend of
    the stock ``nvcr.io/nvidia/tritonserver`` image, loading the same ``model.pt``.
    """

    backend: Backend = "python"
    kind: Kind = "cpu"
    instances: int = 1
    torch_threads: int = 2
    # The worker sends whole micro-batches: holding one back hoping for a preferred size only adds
    # latency. Requests that queue while the instance is busy (several workers) are still merged.
    max_queue_delay_us: int = 0


def local_cpu_target(cpus: int | None = None) -> ExportTarget:
    """The embedded stack's Triton, on the cores it shares with the worker and the broker.

    Two single-threaded instances rather than one with two threads: on 2 shared cores an
    intra-op thread pool stalls whenever one of its threads is preempted (a batch of 8 took 4x its
    solo time beside a busy worker), while two instances run two batches side by side; MobileNet
    and MiniLM served 1.3x and 1.4x more per second that way here.
    """
    cpus = cpus or os.cpu_count() or 1
    instances = min(2, cpus)
    return ExportTarget(instances=instances, torch_threads=max(1, cpus // instances))


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


def render_config(spec: EncoderSpec, target: ExportTarget) -> str:
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
    if target.backend == "pytorch":
        lines.append(_param("INFERENCE_MODE", "true"))
    return "\n".join(lines) + "\n"
