"""The demo's last step: its image and text embeddings into LanceDB and Feast, one search, one lookup.

Both sinks run in-process as ``embedstream sink lancedb|feast`` runs them (``service.create_sink``:
a consumer group per store on the output topics, offsets committed after the store acknowledged),
until every row the demo read back is stored. Then the stores are counted row by row against what
was read back (the demo's accounting: each embedding stored once per store, none missing), a new
copy of a photo is searched in LanceDB (embedded through the served image model), and one row is
looked up in Feast's online store with ``get_online_features``.

The stores live under ``<workdir>/stores`` and are made afresh each run, so the counts are this
run's.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedstream.config import Settings
from embedstream.modalities import defaults, registered

if TYPE_CHECKING:
    from rich.console import Console

    from embedstream.local.readback import Readback

STORES = ("lancedb", "feast")
# The pretrained encoders' embeddings, whose neighbours mean something; the demo reads time series for
# their anomaly flags instead.
MODALITIES = tuple(m for m in registered() if defaults(m).pretrained)
QUERY_SEED = 4242  # the query photo: a copy the stream never carried


@dataclass(frozen=True)
class SinkLane:
    modality: str
    settings: Settings  # the pipeline's, pointed at the local stack
    readback: Readback  # what the demo read back from its output topic
    groups: Mapping[bytes, str]  # key -> what it is a copy or paraphrase of


def sinks_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("lancedb", "feast"))


def _sink_settings(base: Settings, topics: list[str], root: Path, store: str) -> Settings:
    sink = base.sink.model_copy(
        update={
            "topics": tuple(topics),
            "group_id": f"embedstream-demo-sink-{store}",
            "dead_letter_topic": f"deadletter.sink.{store}",
            "lancedb_uri": str(root / "lancedb"),
            "feast_repo": root / "feature_repo",
            "max_wait_ms": 100,
        }
    )
    return base.model_copy(update={"sink": sink})


def _run_sinks(lanes: list[SinkLane], root: Path, timeout_s: float) -> dict[str, int]:
    """Both sinks until each stored every row read back; returns rows each store acknowledged."""
    from embedstream.stores.service import create_sink

    expected = sum(lane.readback.rows for lane in lanes)
    topics = [lane.settings.kafka.output_topic for lane in lanes]
    sinks = [create_sink(store, _sink_settings(lanes[0].settings, topics, root, store)) for store in STORES]
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(sink: Any) -> None:
        try:
            sink.run(stop)
        except BaseException as exc:  # surfaced below, after the other sink stopped too
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,), name=f"sink-{s.store.name}", daemon=True) for s in sinks]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + timeout_s
        while any(s.stats.rows_stored < expected for s in sinks) and not errors:
            if time.monotonic() > deadline:
                got = ", ".join(f"{s.store.name} {s.stats.rows_stored}" for s in sinks)
                raise SystemExit(f"the sinks stored {got} of {expected} rows in {timeout_s:.0f} s")
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for s in sinks:
            s.close()
    if errors:
        raise errors[0]
    return {s.store.name: s.stats.rows_stored for s in sinks}


def _ids(readback: Readback) -> list[str]:
    return [str(i) for i in readback.table().column("id").to_pylist()] if readback.rows else []


def count_stored(lanes: list[SinkLane], root: Path) -> dict[str, dict[str, int]]:
    """Per modality and store: the rows read back that the store holds, each once (a duplicate fails)."""
    from embedstream.stores.feast_store import FeastStore
    from embedstream.stores.lance_store import LanceStore, table_name

    lance = LanceStore(str(root / "lancedb"))
    feast = FeastStore(root / "feature_repo")
    out: dict[str, dict[str, int]] = {}
    for lane in lanes:
        ids = _ids(lane.readback)
        if not ids:
            out[lane.modality] = dict.fromkeys(STORES, 0)
            continue
        table = lane.readback.tables[0]
        name = table_name(str(table.column("model_name")[0]), str(table.column("model_version")[0]))
        stored = lance.open(name).to_arrow().column("id").to_pylist()
        extra = len(stored) - len(set(stored) & set(ids))
        if extra:  # a fresh table: anything beyond the rows read back is a duplicate or a stranger
            raise SystemExit(f"LanceDB table {name} holds {extra} rows beyond the {len(ids)} read back")
        model, version = str(table.column("model_name")[0]), str(table.column("model_version")[0])
        found = feast.online_vectors(lane.modality, [(i, model, version) for i in ids])
        out[lane.modality] = {"lancedb": len(stored), "feast": sum(v is not None for v in found)}
    return out


def _print_search(lane: SinkLane, root: Path, console: Console) -> None:
    from embedstream.local.samples.photos import photo_stream
    from embedstream.ops.search import search_new
    from embedstream.stores.lance_store import LanceStore, table_name

    first = lane.readback.tables[0]
    table = LanceStore(str(root / "lancedb")).open(
        table_name(str(first.column("model_name")[0]), str(first.column("model_version")[0]))
    )
    query = next(photo_stream(1, seed=QUERY_SEED, prefix="query"))
    hits = search_new(lane.settings, table, 5, image=query.value)
    console.print(
        f"[green]search[/] a new copy of {query.source!r} (never in the stream) in LanceDB table {table.name}:"
    )
    for rank, hit in enumerate(hits, 1):
        of = lane.groups.get(hit.id.encode(), "?")
        console.print(f"  {rank}. {hit.id}  cosine distance {hit.distance:.3f}  copy of {of!r}")


def _print_lookup(lane: SinkLane, root: Path, console: Console) -> None:
    from embedstream.stores.feast_repo import view_name
    from embedstream.stores.feast_store import FeastStore

    first = lane.readback.tables[0]
    row_id, model, version = (str(first.column(c)[0]) for c in ("id", "model_name", "model_version"))
    [vector] = FeastStore(root / "feature_repo").online_vectors(lane.modality, [(row_id, model, version)])
    emb = first.column("embedding").combine_chunks()
    published = np.asarray(pa.FixedSizeListArray.from_arrays(emb.values, emb.type.list_size)[0].values)
    same = vector is not None and np.array_equal(np.asarray(vector, np.float32), published)
    head = ", ".join(f"{x:.3f}" for x in (vector or [])[:4])
    console.print(
        f"[green]feast[/] get_online_features({view_name(lane.modality)}:embedding, id={row_id!r}, "
        f"model_name={model!r}, model_version={version!r}) -> {len(vector or [])}-d [{head}, ...]; "
        f"equal to the published row: {'yes' if same else 'NO'}"
    )


def sink_demo(
    lanes: list[SinkLane], workdir: Path, console: Console, timeout_s: float = 120.0
) -> dict[str, dict[str, int]]:
    """Sink the lanes' output topics into both stores, print a search and a lookup; returns count_stored."""
    from embedstream.stores.feast_repo import write_repo

    lanes = [lane for lane in lanes if lane.modality in MODALITIES and lane.readback.rows]
    if not lanes:
        return {}
    root = workdir / "stores"
    shutil.rmtree(root, ignore_errors=True)
    began = time.monotonic()
    with console.status(
        f"sinking {' and '.join(lane.modality for lane in lanes)} embeddings into LanceDB and Feast..."
    ):
        write_repo(root / "feature_repo")
        written = _run_sinks(lanes, root, timeout_s)
        counts = count_stored(lanes, root)
    console.print(
        "[green]stores[/] "
        + ", ".join(f"{store} {n} rows written" for store, n in written.items())
        + f" in {time.monotonic() - began:.1f} s (LanceDB {root / 'lancedb'}, Feast repository {root / 'feature_repo'})"
    )
    image = next((lane for lane in lanes if lane.modality == "image"), None)
    if image is not None:
        _print_search(image, root, console)
    _print_lookup(image or lanes[0], root, console)
    return counts
