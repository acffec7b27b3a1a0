"""Subcommands ``sink <store>`` (one per registered store: ``stores/registry.py``) and ``search``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from embedstream.cli_support import Commands, flag, settings_from_args, stop_on_signals
from embedstream.errors import ConfigError
from embedstream.stores.registry import store_kind, store_kinds

log = logging.getLogger("embedstream")


def _common(p: argparse.ArgumentParser) -> None:
    flag(p, "--config", "CONFIG", "TOML config file ([kafka] brokers and security, [sink]); optional")
    flag(p, "--bootstrap", "KAFKA__BOOTSTRAP_SERVERS", "Kafka bootstrap servers (overrides the config file)")
    flag(p, "--lancedb-uri", "SINK__LANCEDB_URI", "LanceDB directory or URI (overrides [sink] lancedb_uri)")


def register(sub: argparse._SubParsersAction) -> Commands:
    p = sub.add_parser("sink", help="write output-topic rows into a store (Feast online store, LanceDB table)")
    stores = p.add_subparsers(dest="store", required=True)
    for kind in store_kinds():
        s = stores.add_parser(kind.name, help=kind.help)
        kind.add_flags(s)
        _common(s)
        flag(s, "--topics", "SINK_TOPICS", "comma-separated output topics (overrides [sink] topics)")
        flag(s, "--group-id", "SINK__GROUP_ID", "consumer group (default embedstream-sink-<store>)")
        flag(s, "--health-port", "HEALTH_PORT", "health/metrics port (0: any free port)", type=int)

    p = sub.add_parser("search", help="k nearest rows of a LanceDB table to a stored row or a new image/sentence")
    _common(p)
    p.add_argument("--table", help="table (<model>-v<version>); default: the only one")
    flag(p, "--alias", "ROLLOUT_ALIAS", "search the version serving this rollout alias (docs/rollout.md)")
    flag(p, "--state", "ROLLOUT_STATE", "rollout document (default: _rollout.json in the LanceDB location)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", dest="row_id", help="a stored row's id")
    what.add_argument("--image", type=Path, help="a new image file, embedded by the model that made the table's rows")
    what.add_argument("--text", help="a new sentence, embedded by the model that made the table's rows")
    flag(
        p,
        "--triton-url",
        "TRITON__URL",
        "Triton serving the table's model, for --image/--text (overrides [triton])",
    )
    p.add_argument("-k", type=int, default=5, help="how many neighbours (default 5)")
    return {"sink": cmd_sink, "search": cmd_search}


def _settings(args: argparse.Namespace) -> Any:
    overrides: dict[str, Any] = {}
    if getattr(args, "triton_url", None):
        overrides["triton"] = {"url": args.triton_url}
    sink: dict[str, Any] = {}
    if getattr(args, "lancedb_uri", None):
        sink["lancedb_uri"] = args.lancedb_uri
    if getattr(args, "feast_repo", None):
        sink["feast_repo"] = args.feast_repo
    if getattr(args, "topics", None):
        sink["topics"] = [t.strip() for t in args.topics.split(",") if t.strip()]
    if getattr(args, "group_id", None):
        sink["group_id"] = args.group_id
    if sink:
        overrides["sink"] = sink
    if getattr(args, "health_port", None) is not None:
        overrides["health_port"] = args.health_port
    return settings_from_args(args, **overrides)


def cmd_sink(args: argparse.Namespace) -> int:
    own = store_kind(args.store).command(args)
    if own is not None:
        return own
    from embedstream.stores.service import run_sink

    stats = run_sink(args.store, _settings(args), stop_on_signals())
    log.info("sink stopped: %s", stats)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from embedstream.ops.search import pick_table, search_by_id, search_new
    from embedstream.stores.lance_store import LanceStore

    settings = _settings(args)
    if args.alias:
        if args.table:
            raise ConfigError("search takes --table or --alias, not both")
        from embedstream.ops.search import AliasReader

        _, table = AliasReader(settings.sink.lancedb_uri, args.state).table(args.alias)
    else:
        store = LanceStore(settings.sink.lancedb_uri)
        table = store.open(pick_table(store.table_names(), args.table))
    if args.row_id is not None:
        hits = search_by_id(table, args.row_id, args.k)
        query = f"row {args.row_id}"
    elif args.image is not None:
        hits = search_new(settings, table, args.k, image=args.image.read_bytes())
        query = str(args.image)
    else:
        hits = search_new(settings, table, args.k, text=args.text)
        query = repr(args.text)
    print(f"{len(hits)} nearest to {query} in {table.name} (cosine distance):")
    for rank, hit in enumerate(hits, 1):
        r = hit.row
        print(
            f"{rank:>3}. {hit.distance:.4f}  {hit.id}  {r['source_topic']}/{r['source_partition']}@{r['source_offset']}"
        )
    return 0
