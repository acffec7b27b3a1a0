"""Subcommands ``config check``, ``tail``, ``replay`` and ``dlq list|redrive`` (registered by embedstream.cli)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedstream.cli_support import Commands, flag, require_tools, settings_from_args
from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer

    from embedstream.config import KafkaSettings
    from embedstream.ops.replay import ReplayRange


def _connection(p: argparse.ArgumentParser) -> None:
    flag(p, "--config", "CONFIG", "TOML config file (brokers, SASL/TLS); optional")
    flag(p, "--bootstrap", "KAFKA__BOOTSTRAP_SERVERS", "Kafka bootstrap servers (overrides the config file)")


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    c = config_sub.add_parser("check", help="validate a config file; print the effective settings, secrets masked")
    c.add_argument("file", help="TOML config file (EMBEDSTREAM_* environment variables apply on top)")


def _add_tail(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tail", help="print embeddings from an output topic; optionally plot a 2-D PCA")
    p.add_argument("topic", help="output topic (Arrow IPC messages)")
    _connection(p)
    flag(p, "--from", "TAIL_FROM", "where to start", default="latest", choices=["beginning", "latest"], dest="start")
    p.add_argument("--follow", action="store_true", help="keep reading after the end (always so with --from latest)")
    flag(p, "--max", "TAIL_MAX", "stop after this many rows", type=int, dest="max_rows")
    flag(p, "--timeout", "TAIL_TIMEOUT_S", "stop after this many seconds", type=float)
    flag(p, "--dims", "TAIL_DIMS", "leading embedding dims to print", default="4", type=int)
    flag(p, "--plot", "TAIL_PLOT", "write a 2-D PCA scatter of the rows read to this PNG file")
    flag(p, "--plot-sample", "TAIL_PLOT_SAMPLE", "rows kept for the plot", default="5000", type=int)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="copy a range of a topic (records as they were) into a replay topic")
    _connection(p)
    flag(p, "--from-topic", "REPLAY_FROM_TOPIC", "topic to read, usually a worker input topic")
    flag(p, "--to-topic", "REPLAY_TO_TOPIC", "topic to write; created like the source if missing")
    flag(p, "--partition", "REPLAY_PARTITIONS", "comma-separated partitions (default: all)")
    flag(p, "--start-offset", "REPLAY_START_OFFSET", "first offset, per partition", type=int)
    flag(p, "--end-offset", "REPLAY_END_OFFSET", "end offset, exclusive (default: the end now)", type=int)
    flag(p, "--start-time", "REPLAY_START_TIME", "first record at or after this time (ISO 8601 or epoch ms)")
    flag(p, "--end-time", "REPLAY_END_TIME", "stop before records at or after this time")
    p.add_argument("--dry-run", action="store_true", help="print the offset ranges and copy nothing")


def _add_dlq(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dlq", help="dead-letter topic tools")
    dlq_sub = p.add_subparsers(dest="dlq_command", required=True)
    d = dlq_sub.add_parser("list", help="reasons summary and one line per dead letter (no payloads)")
    d.add_argument("topic", help="dead-letter topic")
    _connection(d)
    flag(d, "--max", "DLQ_MAX", "lines to print (the summary counts all)", default="100", type=int, dest="max_rows")
    d = dlq_sub.add_parser("redrive", help="re-produce dead letters' original key, bytes and headers to a topic")
    d.add_argument("topic", help="dead-letter topic")
    _connection(d)
    flag(d, "--to", "DLQ_REDRIVE_TO", "input topic to send them to", dest="to_topic")
    flag(d, "--reason", "DLQ_REDRIVE_REASON", "only dead letters with this reason")
    d.add_argument("--dry-run", action="store_true", help="count what would be sent and send nothing")


def register(sub: argparse._SubParsersAction) -> Commands:
    _add_config(sub)
    _add_tail(sub)
    _add_replay(sub)
    _add_dlq(sub)
    return {"config": cmd_config, "tail": cmd_tail, "replay": cmd_replay, "dlq": cmd_dlq}


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _reader(k: KafkaSettings) -> KafkaConsumer:
    from embedstream.kafka_io import make_reader

    return make_reader(k, client_id=f"{k.client_id}-ops")


def _writer(k: KafkaSettings) -> KafkaProducer:
    from embedstream.kafka_io import make_writer

    return make_writer(k, client_id=f"{k.client_id}-ops", enable_idempotence=True)


def cmd_config(args: argparse.Namespace) -> int:
    from embedstream.config import load_settings
    from embedstream.ops.configcheck import render_masked

    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    print(f"# effective settings from {args.file} and EMBEDSTREAM_* variables (secrets masked)")
    print(render_masked(settings), end="")
    _err(f"{args.file}: OK")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from embedstream.ops.tail import Sample, plot_pca, tail

    if args.plot:
        # Before reading, not after: the rows read would be lost to a missing plotting library.
        require_tools("--plot", "matplotlib")
    settings = settings_from_args(args)
    sample = Sample(args.plot_sample) if args.plot else None
    consumer = _reader(settings.kafka)
    try:
        rows, bad = tail(
            consumer,
            args.topic,
            from_beginning=args.start == "beginning",
            follow=args.follow or args.start == "latest",
            max_rows=args.max_rows,
            timeout_s=args.timeout,
            dims=args.dims,
            emit=lambda line: print(line, flush=True),
            sample=sample,
        )
    finally:
        consumer.close()
    _err(f"# {rows} rows from {args.topic}" + (f", {bad} messages that were not embedstream Arrow" if bad else ""))
    if sample is not None:
        if sample.size < 2:
            _err("# too few rows for a plot")
            return 1
        matrix, groups = sample.data()
        plot_pca(matrix, groups, Path(args.plot), args.topic)
        _err(f"# PCA of {len(groups)} embeddings written to {args.plot}")
    return 0


def _required(args: argparse.Namespace, **names: str) -> None:
    for attr, option in names.items():
        if not getattr(args, attr):
            raise ConfigError(f"{option} is required")


def _replay_range(args: argparse.Namespace) -> ReplayRange:
    from embedstream.ops.kafka import parse_time_ms
    from embedstream.ops.replay import ReplayRange

    _required(args, from_topic="--from-topic", to_topic="--to-topic")
    if args.from_topic == args.to_topic:
        raise ConfigError("--to-topic must differ from --from-topic (a replay into itself never ends)")
    if args.start_offset is not None and args.start_time:
        raise ConfigError("give --start-offset or --start-time, not both")
    if args.end_offset is not None and args.end_time:
        raise ConfigError("give --end-offset or --end-time, not both")
    try:
        partitions = tuple(int(x) for x in args.partition.split(",")) if args.partition else None
    except ValueError:
        raise ConfigError(f"--partition: not a comma-separated list of numbers: {args.partition!r}") from None
    return ReplayRange(
        topic=args.from_topic,
        partitions=partitions,
        start_offset=args.start_offset,
        end_offset=args.end_offset,
        start_time_ms=parse_time_ms(args.start_time) if args.start_time else None,
        end_time_ms=parse_time_ms(args.end_time) if args.end_time else None,
    )


@contextmanager
def _replay_progress(total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; without rich (the ``tools`` extra), a plain line every tenth of the way."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:
        yield _plain_progress(total)
        return
    progress = Progress(
        TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip
    with progress:
        task = progress.add_task("replay", total=total)
        yield lambda d: progress.advance(task, d)


def _plain_progress(total: int) -> Callable[[int], None]:
    step = max(1, total // 10)
    done = shown = 0

    def advance(n: int) -> None:
        nonlocal done, shown
        done += n
        if done // step > shown:
            shown = done // step
            _err(f"# replay: {done}/{total}")

    return advance


def cmd_replay(args: argparse.Namespace) -> int:
    from embedstream.kafka_io import ensure_topics, partitions_of
    from embedstream.ops.kafka import AckedSender
    from embedstream.ops.replay import plan, replay

    r = _replay_range(args)
    k = settings_from_args(args).kafka
    consumer = _reader(k)
    try:
        try:
            spans = plan(consumer, r)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for s in spans:
            _err(f"# {r.topic}[{s.partition}] offsets {s.start}..{s.end} ({s.size} records)")
        total = sum(s.size for s in spans)
        if args.dry_run:
            print(f"would replay {total} records from {r.topic} to {args.to_topic}")
            return 0
        # Same partition count as the source, so each record can keep its partition number (and order).
        ensure_topics(k, {args.to_topic: len(partitions_of(consumer, r.topic))})
        target = set(partitions_of(consumer, args.to_topic))
        producer = _writer(k)
        try:
            # An upper bound: compaction and transaction markers leave offsets without records.
            with _replay_progress(total) as advance:
                sender = AckedSender(producer)
                n = replay(
                    consumer, sender, spans, r.topic, args.to_topic, target, advance, r.start_time_ms, r.end_time_ms
                )
        finally:
            producer.close()
    finally:
        consumer.close()
    print(f"replayed {n} records from {r.topic} to {args.to_topic}")
    return 0


def _read_dead_letters(consumer: Any, topic: str) -> list[Any]:
    from embedstream.topic_reader import offset_spans, read_spans

    # Up to the end as of now: dead letters that arrive meanwhile wait for the next run.
    return list(read_spans(consumer, topic, offset_spans(consumer, topic)))


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    consumer = _reader(settings.kafka)
    try:
        records = _read_dead_letters(consumer, args.topic)
    finally:
        consumer.close()
    if args.dlq_command == "list":
        return _dlq_list(args, records)
    return _dlq_redrive(args, settings, records)


def _dlq_list(args: argparse.Namespace, records: list[Any]) -> int:
    from embedstream.ops.dlq import DeadLetterRow, reason_counts

    rows = [DeadLetterRow.of(r) for r in records]
    print(f"{len(rows)} dead letters in {args.topic}")
    for reason, count in reason_counts(rows):
        print(f"  {reason:<20} {count}")
    if rows:
        print("partition@offset  reason  key  source  bytes  error: message")
    for row in rows[: args.max_rows]:
        size = f"{row.size}" if row.value_dropped is None else f"dropped({row.value_dropped})"
        print(
            f"{row.partition}@{row.offset}  {row.reason}  {row.key_text()}  {row.source}  {size}  "
            f"{row.error_class}: {row.message}"
        )
    if len(rows) > args.max_rows:
        print(f"... {len(rows) - args.max_rows} more (--max)")
    return 0


def _dlq_redrive(args: argparse.Namespace, settings: Any, records: list[Any]) -> int:
    from embedstream.ops.dlq import plan_redrive, redrive_message
    from embedstream.ops.kafka import AckedSender

    _required(args, to_topic="--to")
    plan = plan_redrive(records, args.reason)
    if plan.dropped:
        _err(
            f"skipped {len(plan.dropped)} dead letters whose value was dropped (too large to re-publish); "
            "re-drive them from their source coordinates with `embedstream replay`:"
        )
        for row in plan.dropped:
            _err(f"  {row.source}  ({row.value_dropped} bytes, key {row.key_text()!r})")
    if plan.other_reason:
        _err(f"left {plan.other_reason} dead letters with another reason than {args.reason!r}")
    if args.dry_run:
        print(f"would redrive {len(plan.send)} dead letters from {args.topic} to {args.to_topic}")
        return 0
    producer = _writer(settings.kafka)
    try:
        sender = AckedSender(producer)
        for rec in plan.send:
            sender.send(**redrive_message(rec, args.to_topic))
        sender.drain()
    finally:
        producer.close()
    print(f"redriven {sender.acked} dead letters from {args.topic} to {args.to_topic}")
    return 0
