"""``embedstream bench`` on the command line: options, the run, the summary table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from embedstream.cli_support import Commands, flag, local_settings, require_tools
from embedstream.local.bench.counts import DEFAULT_COUNTS, DEFAULT_PLUMBING, described

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> Commands:
    p = sub.add_parser(
        "bench",
        help="measure bare model, Triton alone, the pipeline (saturation, 50%% load) and its plumbing, per modality",
    )
    flag(p, "--config", "CONFIG", "TOML config file (the image pipeline's base settings)")
    flag(p, "--modalities", "BENCH_MODALITIES", "comma-separated modalities", default="image,text,timeseries")
    flag(
        p,
        "--count",
        "BENCH_COUNT",
        f"messages per model-bound stage for every modality (default: {described(DEFAULT_COUNTS)})",
        type=int,
    )
    flag(
        p,
        "--plumbing-count",
        "BENCH_PLUMBING_COUNT",
        "at least this many messages for the null-encoder and raw kafka-python stages "
        f"(default: {described(DEFAULT_PLUMBING)})",
        default="0",
        type=int,
    )
    flag(
        p,
        "--stages",
        "BENCH_STAGES",
        "comma-separated stages to run, with the ones they read (default: all; e.g. pipeline,peer)",
    )
    flag(p, "--out", "BENCH_OUT", "directory for bench.json and the PNG plots", default=".embedstream/bench")
    flag(p, "--workdir", "BENCH_WORKDIR", "stack logs and model repository", default=".embedstream/bench-stack")
    flag(p, "--partitions", "PARTITIONS", "partitions of the input/output topics", default="4", type=int)
    flag(
        p,
        "--workers",
        "BENCH_WORKERS",
        "above 1: also run the pipeline at saturation with this many workers in one consumer group",
        default="1",
        type=int,
    )
    flag(
        p,
        "--kafka-client",
        "BENCH_KAFKA_CLIENT",
        "the workers' Kafka client, kafka-python or librdkafka (kafka.client; peers and raw stages: kafka-python)",
        choices=("kafka-python", "librdkafka"),
    )
    return {"bench": cmd_bench}


def cmd_bench(args: argparse.Namespace) -> int:
    require_tools("embedstream bench", "rich", "matplotlib")
    from rich.console import Console

    from embedstream.local.bench.report import summary_table
    from embedstream.local.bench.run import BenchOptions, run_bench
    from embedstream.local.bench.workload import MODALITIES

    console = Console()
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if not modalities or set(modalities) - set(MODALITIES):
        console.print(f"[red]--modalities takes a comma-separated subset of {', '.join(MODALITIES)}[/]")
        return 2
    counts = {m: int(args.count) if args.count else DEFAULT_COUNTS[m] for m in modalities}
    settings = local_settings(args.config)
    if args.kafka_client:
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"client": args.kafka_client})}
        )
    if not 1 <= args.workers <= args.partitions:
        console.print(
            f"[red]--workers takes 1 to --partitions ({args.partitions}): a member without a partition idles[/]"
        )
        return 2
    from embedstream.local.bench.table import STAGE_TABLE

    known = [s.name for s in STAGE_TABLE]
    stages = frozenset(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
    if stages is not None and (not stages or stages - set(known)):
        console.print(f"[red]--stages takes a comma-separated subset of {', '.join(known)}[/]")
        return 2
    opts = BenchOptions(
        modalities,
        counts,
        Path(args.out),
        Path(args.workdir),
        args.partitions,
        args.plumbing_count,
        args.workers,
        stages,
    )
    run = run_bench(settings, opts, console)
    console.print(summary_table(run.results))
    console.print(
        f"{run.meta['machine']['cpus']} CPUs shared by the broker, Triton, the workers and this process; "
        f"workers on {settings.kafka.client}; {run.meta['seconds']:.0f} s in all"
    )
    for what, path in run.files.items():
        console.print(f"[green]{what}[/] {path}")
    return 0
