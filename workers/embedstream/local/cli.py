"""The embedded stack's commands: ``up``, ``demo``, ``produce-samples`` and ``samples``."""

from __future__ import annotations

import argparse
from pathlib import Path

from embedstream.cli_support import Commands, env, flag, local_settings, require_tools, stop_on_signals
from embedstream.errors import ConfigError

_PRODUCE_DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def register(sub: argparse._SubParsersAction) -> Commands:
    for name, help_text in (
        ("up", "serve every modality on the embedded stack (one broker, one Triton); keep running until Ctrl-C"),
        ("demo", "run the main job on the embedded stack and print a summary"),
    ):
        p = sub.add_parser(name, help=help_text)
        flag(p, "--config", "CONFIG", "TOML config file")
        flag(p, "--partitions", "PARTITIONS", "partitions of the input/output topics", default="4", type=int)
        flag(p, "--workdir", "WORKDIR", "directory for logs and the model repository", default=".embedstream")
        if name == "demo":
            count_help = "sample messages per modality (time series: a third)"
            flag(p, "--count", "DEMO_COUNT", count_help, default="300", type=int)
            modalities_help = "comma-separated modalities to run"
            flag(p, "--modalities", "DEMO_MODALITIES", modalities_help, default="image,text,timeseries")
            flag(p, "--bad-every", "DEMO_BAD_EVERY", "make every Nth image corrupt (0: none)", default="50", type=int)
        else:
            flag(p, "--broker-port", "BROKER_PORT", "broker port (0: any free port)", default="9092", type=int)
            flag(
                p, "--workers", "WORKERS", "worker processes per modality, in its consumer group", default="1", type=int
            )
            modalities_help = "comma-separated modalities to serve"
            flag(p, "--modalities", "UP_MODALITIES", modalities_help, default="image,text,timeseries")
            durable = (env("DURABLE") or "").lower() in ("1", "true", "yes")
            p.add_argument(
                "--durable",
                action="store_true",
                default=durable,
                help="keep the broker's topics, records and offsets across restarts, in a local S3 server "
                "under the workdir [env EMBEDSTREAM_DURABLE=true; default: %(default)s]",
            )

    p = sub.add_parser(
        "produce-samples", help="produce sample messages to a topic: generated images, or the paraphrase sentences"
    )
    flag(p, "--config", "CONFIG", "TOML config file: its [kafka] connection settings (TLS, SASL) are used")
    flag(p, "--bootstrap", "KAFKA__BOOTSTRAP_SERVERS", "Kafka bootstrap servers", default=_PRODUCE_DEFAULT_BOOTSTRAP)
    p.add_argument(
        "--modality",
        choices=["image", "text", "timeseries"],
        default="image",
        help="generated images, the paraphrase sentences, or 32x3 signal windows [default: image]",
    )
    flag(p, "--topic", "KAFKA__INPUT_TOPIC", "input topic (default: the modality's: images, text, timeseries)")
    flag(p, "--count", "DEMO_COUNT", "how many", default="100", type=int)
    flag(p, "--bad-every", "DEMO_BAD_EVERY", "make every Nth image corrupt (0: none)", default="0", type=int)

    p = sub.add_parser(
        "samples",
        help="write the packaged sample inputs as files: the 25 real photos (a folder) or the paraphrase "
        "sentences (one per line), to try train detector, search and the probes on",
    )
    p.add_argument("what", choices=["photos", "sentences"])
    p.add_argument("--out", required=True, help="photos: a folder (made if missing); sentences: a text file")

    return {"up": cmd_up, "demo": cmd_demo, "produce-samples": cmd_produce, "samples": cmd_samples}


def cmd_samples(args: argparse.Namespace) -> int:
    from embedstream.local.samples.catalog import write_photos, write_sentences

    out = Path(args.out)
    written = write_photos(out) if args.what == "photos" else write_sentences(out)
    print(f"wrote {written} {args.what} to {out}")
    return 0


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
    return serve(pipelines, opts, stop_on_signals())


def cmd_produce(args: argparse.Namespace) -> int:
    from embedstream.config import KafkaSettings, load_settings
    from embedstream.local.demo import produce
    from embedstream.local.samples.catalog import sample_messages

    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    if args.config:
        # The config's connection settings (TLS, SASL); its brokers unless --bootstrap names others.
        overrides = {} if args.bootstrap == _PRODUCE_DEFAULT_BOOTSTRAP else {"bootstrap_servers": args.bootstrap}
        kafka = load_settings(args.config, **({"kafka": overrides} if overrides else {})).kafka
    topic = args.topic or {"image": "images"}.get(args.modality, args.modality)
    n = len(produce(kafka, topic, sample_messages(args.modality, args.count, args.bad_every)))
    print(f"produced {n} {args.modality} samples to {topic}")
    return 0
