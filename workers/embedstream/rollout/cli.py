"""``embedstream rollout start|status|compare|switch|rollback|retire`` and ``embedstream upkeep``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedstream.cli_support import Commands, flag, settings_from_args
from embedstream.errors import ConfigError
from embedstream.rollout import local_workers
from embedstream.rollout import serving as triton_models

if TYPE_CHECKING:
    from embedstream.aliases import Deployed, ModelRef
    from embedstream.config import Settings
    from embedstream.rollout.steps import Progress
    from embedstream.stores.lance_store import LanceStore


def _common(p: argparse.ArgumentParser, config_help: str = "TOML config file (brokers, [sink] lancedb_uri)") -> None:
    flag(p, "--config", "CONFIG", config_help)
    flag(p, "--bootstrap", "KAFKA__BOOTSTRAP_SERVERS", "Kafka bootstrap servers (overrides the config file)")
    flag(p, "--lancedb-uri", "SINK__LANCEDB_URI", "LanceDB directory or URI (overrides [sink] lancedb_uri)")
    flag(p, "--state", "ROLLOUT_STATE", "rollout document (default: _rollout.json in the LanceDB location)")


def _alias(p: argparse.ArgumentParser) -> None:
    flag(p, "--alias", "ROLLOUT_ALIAS", "what readers ask for (e.g. images, ts): search --alias, Feast readers")


def register(sub: argparse._SubParsersAction) -> Commands:
    p = sub.add_parser("rollout", help="a new model version beside the old one: backfill, switch, roll back, retire")
    steps = p.add_subparsers(dest="rollout_command", required=True)

    s = steps.add_parser("start", help="name the new version the candidate and place its consumer group")
    _common(s, "the NEW version's worker config (encoder, its own [kafka] group_id, input topic)")
    _alias(s)
    flag(s, "--serving-config", "ROLLOUT_SERVING_CONFIG", "for a new alias: the config of the version serving now")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--from-offset", type=int, help="start every partition at this offset (default: the oldest)")
    where.add_argument("--from-time", help="start at the first record at or after this time (ISO 8601 or epoch ms)")
    flag(s, "--spawn", "ROLLOUT_SPAWN", "launch this many `embedstream worker` processes here", default="0", type=int)
    flag(s, "--log-dir", "ROLLOUT_LOG_DIR", "where spawned workers log", default=".embedstream/logs")
    s.add_argument(
        "--no-load",
        action="store_true",
        help="do not load the new model into Triton (config's [triton] url) first: a Triton that loads "
        "every model at start (model control mode none) already serves it",
    )

    s = steps.add_parser("status", help="the candidate's lag per partition, progress and ETA; rows per version")
    _common(s)
    _alias(s)
    flag(s, "--interval", "ROLLOUT_INTERVAL_S", "seconds between the two looks a rate needs", default="2", type=float)
    s.add_argument("--watch", action="store_true", help="show a progress bar until the candidate has caught up")

    s = steps.add_parser("compare", help="k-NN overlap, anomaly-score drift and rows, candidate vs serving")
    _common(s)
    _alias(s)
    s.add_argument("-k", type=int, default=10, help="neighbours per id (default 10)")
    s.add_argument("--sample", type=int, default=100, help="ids compared (default 100)")

    s = steps.add_parser("switch", help="readers move to the candidate in one step, once it has caught up")
    _common(s)
    _alias(s)
    flag(s, "--max-lag", "ROLLOUT_MAX_LAG", "input records the candidate may still lag by", default="0", type=int)
    flag(s, "--min-coverage", "ROLLOUT_MIN_COVERAGE", "its rows / the serving version's", default="1", type=float)
    s.add_argument("--force", action="store_true", help="switch without the lag and coverage checks")

    s = steps.add_parser("rollback", help="readers move back to the version the last switch replaced")
    _common(s)
    _alias(s)

    s = steps.add_parser("retire", help="stop the kept old version's workers; drop tables past their retention")
    _common(s)
    _alias(s)
    s.add_argument("--candidate", action="store_true", help="abandon the version being rolled out instead")
    flag(s, "--retention", "ROLLOUT_RETENTION_S", "seconds its table is kept", default="86400", type=float)
    s.add_argument("--no-unload", action="store_true", help="leave the retired model loaded in Triton")

    p = sub.add_parser("upkeep", help="compact LanceDB tables and refresh their index; fragments before/after")
    _common(p)
    p.add_argument("--table", action="append", help="a table (repeatable); default: every table")
    flag(p, "--every", "UPKEEP_EVERY_S", "repeat every this many seconds until stopped", type=float)
    return {"rollout": cmd_rollout, "upkeep": cmd_upkeep}


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "lancedb_uri", None):
        overrides["sink"] = {"lancedb_uri": args.lancedb_uri}
    return settings_from_args(args, **overrides)


def _location(args: argparse.Namespace, settings: Settings) -> str:
    from embedstream.aliases import state_location

    return state_location(settings.sink.lancedb_uri, args.state)


def _store(settings: Settings) -> LanceStore:
    from embedstream.stores.lance_store import LanceStore

    return LanceStore(settings.sink.lancedb_uri)


def _rows(store: LanceStore, model: ModelRef) -> int:
    return int(store.open(model.table).count_rows()) if model.table in store.table_names() else 0


def deployed_of(settings: Settings) -> Deployed:
    """The version a worker config embeds with: its served model's name and version, group and topics."""
    from embedstream.aliases import Deployed, ModelRef
    from embedstream.encoders import served_model_name

    model = ModelRef(model_name=served_model_name(settings.encoder), model_version=settings.encoder.version)
    topics = [t.strip() for t in settings.kafka.input_topic.split(",") if t.strip()]
    return Deployed(model=model, group_id=settings.kafka.group_id, topics=topics)


def cmd_rollout(args: argparse.Namespace) -> int:
    if not args.alias:
        raise ConfigError("name the alias: --alias NAME (or EMBEDSTREAM_ROLLOUT_ALIAS)")
    settings = _settings(args)
    location = _location(args, settings)
    handler = {
        "start": _start,
        "status": _status,
        "compare": _compare,
        "switch": _switch,
        "rollback": _rollback,
        "retire": _retire,
    }[args.rollout_command]
    return handler(args, settings, location)


def _start(args: argparse.Namespace, settings: Settings, location: str) -> int:
    from embedstream.config import load_settings
    from embedstream.ops.kafka import parse_time_ms
    from embedstream.rollout import steps

    serving = deployed_of(load_settings(args.serving_config)) if args.serving_config else None
    new = deployed_of(settings)
    if not args.no_load:
        # Before any group moves: a version Triton cannot serve must not start a backfill.
        print(f"loading {new.model.model_name} into Triton at {settings.triton.url}...")
        triton_models.load(settings.triton, new.model.model_name)
    entry = steps.start(
        location,
        args.alias,
        new.model,
        new.group_id or "",
        new.topics,
        settings.kafka,
        serving=serving,
        start_offset=args.from_offset,
        start_time_ms=parse_time_ms(args.from_time) if args.from_time else None,
    )
    candidate = entry.candidate
    if candidate is None:
        raise ConfigError(f"alias {args.alias!r}: the rollout document has no candidate after start")
    print(f"{args.alias}: {entry.serving.model} serves; {new.model} rolls out in group {new.group_id}")
    print(f"  starts at {candidate.start_offsets}; rows go to table {new.model.table}")
    if args.spawn > 0:
        pids = spawn_workers(Path(args.config), args.spawn, Path(args.log_dir), new.model.table)
        recorded = [local_workers.record(pid, Path(args.config)) for pid in pids]
        steps.add_workers(location, args.alias, recorded, gone=lambda w: local_workers.mismatch(w) is not None)
        print(f"  launched workers {pids} (logs in {args.log_dir})")
    else:
        print(f"  run its workers: embedstream worker --config {args.config}  (Kubernetes: docs/rollout.md)")
    return 0


def spawn_workers(config: Path, n: int, log_dir: Path, name: str) -> list[int]:
    """``n`` detached ``embedstream worker`` processes: they outlive this command, ``retire`` stops them."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pids = []
    for i in range(n):
        with (log_dir / f"worker-{name}-{i}.log").open("ab") as out:
            env = {**os.environ, "EMBEDSTREAM_WORKER_ID": f"{name}-{i}", "EMBEDSTREAM_HEALTH_PORT": "0"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "embedstream", "worker", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        pids.append(proc.pid)
    return pids


def _print_progress(p: Progress) -> None:
    for part in p.partitions:
        print(f"  {part.topic}/{part.partition}: committed {part.committed} of {part.end}, lag {part.lag}")
    rate = f"{p.rate:.1f} records/s" if p.rate is not None else "rate unknown"
    eta = f"ETA {p.eta_s:.0f} s" if p.eta_s is not None else "ETA unknown"
    share = p.done / p.total if p.total else 1.0
    width = 30
    bar = "#" * int(share * width) + "-" * (width - int(share * width))
    print(f"  [{bar}] {share:6.1%}  {p.done}/{p.total}, lag {p.lag}, {rate}, {eta}")


def _status(args: argparse.Namespace, settings: Settings, location: str) -> int:
    from embedstream.aliases import load
    from embedstream.rollout import steps

    entry = load(location).alias(args.alias)
    print(f"{args.alias}: {steps.describe(entry)}")
    store = _store(settings)
    for d in (entry.serving, entry.previous, entry.candidate):
        if d is not None:
            print(f"  {d.model}: {_rows(store, d.model)} rows in LanceDB table {d.model.table}")
    if entry.candidate is None:
        return 0
    if args.watch:
        return _watch(args, settings, location)
    first = steps.progress(location, args.alias, settings.kafka)
    time.sleep(args.interval)
    _print_progress(steps.progress(location, args.alias, settings.kafka, previous=first, elapsed_s=args.interval))
    return 0


def _watch(args: argparse.Namespace, settings: Settings, location: str) -> int:
    from embedstream.ops.cli import _replay_progress
    from embedstream.rollout import steps

    last = steps.progress(location, args.alias, settings.kafka)
    shown = last.done
    with _replay_progress(max(1, last.total)) as advance:
        advance(last.done)
        while last.lag > 0:
            time.sleep(args.interval)
            last = steps.progress(location, args.alias, settings.kafka, previous=last, elapsed_s=args.interval)
            advance(max(0, last.done - shown))
            shown = max(shown, last.done)
    _print_progress(last)
    return 0


def _compare(args: argparse.Namespace, settings: Settings, location: str) -> int:
    from embedstream.aliases import load
    from embedstream.rollout.compare import compare

    entry = load(location).alias(args.alias)
    other = entry.candidate or entry.previous
    if other is None:
        raise ConfigError(f"alias {args.alias!r} has one version only: nothing to compare")
    store = _store(settings)
    old, new = entry.serving.model, other.model
    result = compare(store.open(old.table), store.open(new.table), args.k, args.sample)
    print(f"{old} (serving) vs {new}:")
    r = result
    print(f"  rows: {r.rows_old} vs {r.rows_new}; ids in one only: {r.ids_only_old} / {r.ids_only_new}")
    print(f"  {r.k}-NN overlap over {r.sample} ids: mean {r.overlap_mean:.3f}, min {r.overlap_min:.3f}")
    if result.scores is not None:
        s = result.scores
        print(
            f"  {s.column}: mean {s.mean_old:.4g} -> {s.mean_new:.4g}, flagged {s.flagged_old:.1%} -> "
            f"{s.flagged_new:.1%}, mean |change| {s.mean_abs_change:.4g}, rank correlation {s.rank_correlation:.3f}"
        )
    return 0


def _switch(args: argparse.Namespace, settings: Settings, location: str) -> int:
    from embedstream.rollout import kafka as rk
    from embedstream.rollout import steps

    store = _store(settings)

    def lag(d: Deployed) -> int:
        return sum(p.lag for p in rk.group_lag(settings.kafka, d.group_id or "", d.topics, d.start_offsets))

    checks: dict[str, Any] = {} if args.force else {"lag": lag, "rows": lambda m: _rows(store, m)}
    entry = steps.switch(location, args.alias, max_lag=args.max_lag, min_coverage=args.min_coverage, **checks)
    kept = entry.previous.model if entry.previous else "-"
    print(f"{args.alias}: readers now use {entry.serving.model}; {kept} kept")
    return 0


def _rollback(args: argparse.Namespace, settings: Settings, location: str) -> int:
    from embedstream.rollout import steps

    entry = steps.rollback(location, args.alias)
    kept = entry.previous.model if entry.previous else "-"
    print(f"{args.alias}: readers now use {entry.serving.model} again; {kept} kept")
    return 0


def _retire(args: argparse.Namespace, settings: Settings, location: str) -> int:
    from embedstream.rollout import steps

    store = _store(settings)
    servers = settings.kafka.bootstrap_servers

    def stop(target: Deployed) -> local_workers.Stopped:
        return local_workers.stop_workers(target.workers, target.worker_pids, target.group_id, servers)

    done = steps.retire(
        location,
        args.alias,
        which="candidate" if args.candidate else "previous",
        retention_s=args.retention,
        drop_table=lambda m: store.drop(m.table),
        stop=stop,
    )
    if done.retired is None:
        print(f"{args.alias}: no {'candidate' if args.candidate else 'earlier version'} to retire")
    else:
        signalled = ", ".join(map(str, done.stopped.signalled))
        print(f"{args.alias}: retired {done.retired}")
        print(
            f"  stopped its workers on this host (SIGTERM): {signalled}" if signalled else "  no worker of it runs here"
        )
        for pid, why in done.stopped.refused:
            print(f"  not signalled: pid {pid}: {why}")
        print(f"  workers of group {done.group_id} elsewhere: stop them there (Kubernetes: scale the Deployment to 0)")
        if not args.no_unload:
            print(f"  {triton_models.unload(settings.triton, done.retired.model_name)}")
    for model in done.dropped:
        print(f"  dropped table {model.table}")
    for model in done.missing:
        print(f"  {model} had no table {model.table} at {settings.sink.lancedb_uri}: nothing to drop")
    return 0


def cmd_upkeep(args: argparse.Namespace) -> int:
    from embedstream.cli_support import stop_on_signals

    settings = _settings(args)
    uri = settings.sink.lancedb_uri
    if "://" not in uri and not Path(uri).is_dir():  # checked before connecting, which would create it
        raise ConfigError(f"no LanceDB location {uri}: check --lancedb-uri ([sink] lancedb_uri)")
    store = _store(settings)
    if not args.table and not store.table_names():
        # A mistyped location would otherwise be created empty and "maintained" with success.
        raise ConfigError(f"no LanceDB tables at {settings.sink.lancedb_uri}: check --lancedb-uri ([sink] lancedb_uri)")
    stop = stop_on_signals()
    while True:
        for name in args.table or store.table_names():
            r = store.upkeep(name)
            print(
                f"{name}: {r.before.fragments} -> {r.after.fragments} fragments, unindexed rows "
                f"{r.before.unindexed_rows} -> {r.after.unindexed_rows}, {r.seconds:.2f} s"
            )
        if not args.every or stop.wait(args.every):
            return 0
