"""``embedstream worker`` and ``embedstream export-models``: what a deployment runs, a worker and the model
repository its Triton serves."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from embedstream.cli_support import Commands, flag, stop_on_signals

log = logging.getLogger("embedstream")


def register(sub: argparse._SubParsersAction) -> Commands:
    p = sub.add_parser("worker", help="run a worker against the broker and Triton in the config")
    flag(p, "--config", "CONFIG", "TOML config file")

    p = sub.add_parser("export-models", help="export the configured encoder into a Triton model repository")
    flag(p, "--config", "CONFIG", "TOML config file")
    flag(p, "--repo", "MODEL_REPOSITORY", "model repository directory", default="model_repository")
    flag(
        p,
        "--backend",
        "TRITON_BACKEND",
        "Triton backend: python (any Triton), pytorch or onnxruntime (stock image)",
        default="python",
        choices=["python", "pytorch", "onnxruntime"],
    )
    flag(
        p,
        "--artifact",
        "EXPORT_ARTIFACT",
        "model file for the python backend: torchscript (model.pt) or onnx (model.onnx, run with ONNX Runtime); "
        "unset: onnx on --kind cpu, as `embedstream up` serves, torchscript on gpu",
        default=None,
        choices=["torchscript", "onnx"],
    )
    flag(
        p,
        "--onnx-exporter",
        "ONNX_EXPORTER",
        "torch exporter for model.onnx: torchscript (traces, ~1 s) or dynamo (torch.export, ~15 s for Lite0); "
        "unset: the one whose graph runs faster for the family (dynamo for cnn)",
        default=None,
        choices=["torchscript", "dynamo"],
    )
    flag(
        p,
        "--precision",
        "TENSORRT_PRECISION",
        "onnxruntime backend on GPU: build TensorRT engines at fp32 or fp16 (unset: no TensorRT)",
        default=None,
        choices=["fp32", "fp16"],
    )
    flag(p, "--kind", "TRITON_KIND", "instance kind", default="cpu", choices=["cpu", "gpu"])
    flag(
        p,
        "--instances",
        "TRITON_INSTANCES",
        "model instances per device (unset: python backend on cpu as `embedstream up` serves, 2 single-threaded "
        "instances on 2 cores; else 1)",
        type=int,
    )
    flag(p, "--torch-threads", "TORCH_THREADS", "threads per instance (unset: as --instances says; else 2)", type=int)

    return {"worker": cmd_worker, "export-models": cmd_export}


def cmd_worker(args: argparse.Namespace) -> int:
    from embedstream.config import load_settings
    from embedstream.service import run_worker

    settings = load_settings(args.config)
    stats = run_worker(settings, stop_on_signals())
    log.info("worker stopped: %s", stats)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from embedstream.config import load_settings
    from embedstream.export import ExportTarget, export_model
    from embedstream.export.triton_config import local_cpu_target

    settings = load_settings(args.config)
    # Unset, a CPU Python-backend export is what the embedded stack serves (ONNX in ONNX Runtime, its
    # instance shape), so a version exported beside `up`'s models runs as fast as they do.
    local = local_cpu_target() if args.backend == "python" and args.kind == "cpu" else None
    artifact = args.artifact or (local.artifact if local else "torchscript")
    try:
        target = ExportTarget(
            backend=args.backend,
            kind=args.kind,
            instances=args.instances if args.instances is not None else (local.instances if local else 1),
            torch_threads=args.torch_threads
            if args.torch_threads is not None
            else (local.torch_threads if local else 2),
            artifact="onnx" if args.backend == "onnxruntime" else artifact,
            precision=args.precision,
            onnx_exporter=args.onnx_exporter,
        )
    except ValueError as exc:
        print(f"export-models: {exc}", file=sys.stderr)
        return 2
    spec = export_model(settings.encoder, Path(args.repo), target)
    shape = f"{target.artifact}, {args.backend}/{args.kind}, {target.instances} x {target.torch_threads} threads"
    print(f"exported {spec.name} (dim {spec.embedding_dim}; {shape}) to {args.repo}/{spec.name}")
    return 0
