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
        "model file for the python backend: torchscript (model.pt) or onnx (model.onnx, run with ONNX Runtime)",
        default="torchscript",
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
    flag(p, "--instances", "TRITON_INSTANCES", "model instances per device", default="1", type=int)
    flag(p, "--torch-threads", "TORCH_THREADS", "torch threads per instance", default="2", type=int)

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

    settings = load_settings(args.config)
    try:
        target = ExportTarget(
            backend=args.backend,
            kind=args.kind,
            instances=args.instances,
            torch_threads=args.torch_threads,
            artifact="onnx" if args.backend == "onnxruntime" else args.artifact,
            precision=args.precision,
            onnx_exporter=args.onnx_exporter,
        )
    except ValueError as exc:
        print(f"export-models: {exc}", file=sys.stderr)
        return 2
    spec = export_model(settings.encoder, Path(args.repo), target)
    print(f"exported {spec.name} (dim {spec.embedding_dim}, {args.backend}/{args.kind}) to {args.repo}/{spec.name}")
    return 0
