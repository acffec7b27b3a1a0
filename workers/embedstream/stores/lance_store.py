"""LanceDB: a table per model version, Arrow batches merged in as they are, an ANN index once large enough.

A table per (model name, version) keeps vector spaces apart: a model upgrade rolled out side by side
(``docs/operations.md``, ``replay``) fills a table of its own and never mixes with the old one.
Rows are merged by (id, model_name, model_version): an existing row is replaced, a new one inserted.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from embedstream import metrics
from embedstream.stores.base import KEY_COLUMNS, Refusal, StoreUnavailable, check_rows, latest_per_key, model_of
from embedstream.stores.registry import StoreKind, register_store

if TYPE_CHECKING:
    from embedstream.config import Settings

log = logging.getLogger(__name__)

# Writes between two ``optimize()`` calls, which compact the small fragments every write leaves and
# fold new rows into the ANN index (rows not in it yet are still found, by a flat scan). A table also
# gets one once ``optimize_interval_s`` has passed since its last, so a slow stream is kept compact too.
OPTIMIZE_EVERY = 64
OPTIMIZE_INTERVAL_S = 300.0
# How often the fragment and unindexed-row gauges are read from the tables the sink writes: on the first
# write to a table, then at most this often, whichever process compacted it last (`embedstream upkeep`).
HEALTH_INTERVAL_S = 15.0
# How long ``close`` waits for an index build under way; an unfinished build commits nothing, and
# the next sink to write the table starts it again.
INDEX_JOIN_S = 30.0


def table_name(model_name: str, model_version: str) -> str:
    """``<model>-v<version>``, with anything LanceDB does not allow in a name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model_name}-v{model_version}")


def _import_lancedb() -> Any:
    try:
        import lancedb
    except ImportError:
        from embedstream.errors import ConfigError

        raise ConfigError("the LanceDB sink needs lancedb: pip install 'embedstream[sinks]'") from None
    return lancedb


@dataclass(frozen=True)
class TableHealth:
    """What streaming writes leave behind in a table: fragments to compact, rows the ANN index lacks."""

    table: str
    rows: int
    fragments: int
    indexed: bool
    unindexed_rows: int  # all rows while there is no index yet


@dataclass(frozen=True)
class UpkeepReport:
    before: TableHealth
    after: TableHealth
    seconds: float


class LanceStore:
    name = "lancedb"

    def __init__(
        self,
        uri: str,
        index_min_rows: int = 10_000,
        *,
        optimize_every: int = OPTIMIZE_EVERY,
        optimize_interval_s: float = OPTIMIZE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``optimize_every`` writes or ``optimize_interval_s`` seconds, whichever comes first (0: never)."""
        self.uri = uri
        self._db = _import_lancedb().connect(uri)
        self._index_min_rows = index_min_rows
        self._optimize_every = optimize_every
        self._optimize_interval_s = optimize_interval_s
        self._clock = clock
        self._optimized_at: dict[str, float] = {}
        self._tables: dict[str, Any] = {}
        self._schemas: dict[str, pa.Schema] = {}  # per table: existing, or the first admitted rows'
        self._indexed: set[str] = set()
        self._announced: set[str] = set()
        self._health_read_at: dict[str, float] = {}
        # Index builds run beside the writes: building IVF-PQ over 10,000 x 1,280 took ~15 s here, which
        # in the write path held the sink's acknowledgement (and its commit) that long. Lance commits
        # the index and concurrent merges independently; rows merged meanwhile are found by a flat scan.
        self._building: dict[str, threading.Thread] = {}
        self._writes = 0

    # -- the sink's side ------------------------------------------------------------------------------

    def admit(self, table: pa.Table) -> pa.Table | Refusal:
        refused = check_rows(table)
        if refused is not None:
            return refused
        # Lineage lives in the topic's schema metadata; the stored table's schema is the columns alone.
        rows = table.replace_schema_metadata(None)
        name = table_name(*model_of(table))
        expected = self._schema(name)
        if expected is None:
            self._schemas[name] = rows.schema
            return rows
        if rows.schema.equals(expected):
            return rows
        try:
            return rows.select(expected.names).cast(expected)
        except (KeyError, ValueError, pa.ArrowException) as exc:
            return Refusal("store_rejected", f"rows do not fit LanceDB table {name!r}: {exc}", type(exc).__name__)

    def write(self, tables: list[pa.Table]) -> int:
        by_table: dict[str, list[pa.Table]] = {}
        for t in tables:
            if t.num_rows:
                by_table.setdefault(table_name(*model_of_rows(t)), []).append(t)
        written = 0
        for name, parts in by_table.items():
            rows = latest_per_key(pa.concat_tables(parts))
            try:
                tbl = self._open_or_create(name, rows.schema)
                (
                    tbl.merge_insert(list(KEY_COLUMNS))
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(rows)
                )
            except Exception as exc:  # any failed write is an outage: the rows were admitted
                self._tables.pop(name, None)  # reopen next time: the store may have moved under us
                raise StoreUnavailable(f"LanceDB write to {name!r} at {self.uri} failed: {exc}") from exc
            written += rows.num_rows
            if name not in self._announced:  # once per table and process: a user sees where rows go
                self._announced.add(name)
                log.info("stored the first %d rows in LanceDB table %s at %s", rows.num_rows, name, self.uri)
            self._maintain(name, tbl)
        return written

    def close(self) -> None:
        for name, thread in list(self._building.items()):
            thread.join(INDEX_JOIN_S)
            if thread.is_alive():
                log.warning("left the ANN index build of %s unfinished; the next write starts it again", name)
        self._tables.clear()

    def index_builds(self) -> list[str]:
        """Tables whose ANN index is being built now."""
        return sorted(n for n, t in list(self._building.items()) if t.is_alive())

    # -- reading (search, tests) ----------------------------------------------------------------------

    def table_names(self) -> list[str]:
        return sorted(self._list_tables())

    def open(self, name: str) -> Any:
        return self._db.open_table(name)

    # -- upkeep (the sink's schedule, ``embedstream upkeep``, rollout retire) --------------------------

    def health(self, name: str) -> TableHealth:
        tbl = self._db.open_table(name)
        stats = tbl.stats()
        rows = int(stats["num_rows"])
        vector_indices = [ix for ix in tbl.list_indices() if ix.columns == ["embedding"]]
        unindexed = rows
        if vector_indices:
            unindexed = int(tbl.index_stats(vector_indices[0].name).num_unindexed_rows)
        health = TableHealth(name, rows, int(stats["fragment_stats"]["num_fragments"]), bool(vector_indices), unindexed)
        metrics.LANCEDB_FRAGMENTS.labels(name).set(health.fragments)
        metrics.LANCEDB_UNINDEXED_ROWS.labels(name).set(health.unindexed_rows)
        self._health_read_at[name] = self._clock()
        return health

    def upkeep(self, name: str) -> UpkeepReport:
        """Compact the table's fragments and fold new rows into its index now; the health before and after."""
        before = self.health(name)
        began = time.monotonic()
        self._db.open_table(name).optimize()
        seconds = time.monotonic() - began
        self._optimized_at[name] = self._clock()
        metrics.LANCEDB_COMPACTIONS.labels(name).inc()
        return UpkeepReport(before, self.health(name), seconds)

    def drop(self, name: str) -> bool:
        """Drop a table (a retired model version's); False when there was none."""
        if name not in self._list_tables():
            return False
        self._db.drop_table(name)
        self._tables.pop(name, None)
        self._schemas.pop(name, None)
        self._indexed.discard(name)
        return True

    # -- internals ------------------------------------------------------------------------------------

    def _list_tables(self) -> list[str]:
        names: list[str] = []
        token = None
        while True:
            page = self._db.list_tables(page_token=token)
            names += list(page.tables)
            token = page.page_token
            if not token:
                return names

    def _schema(self, name: str) -> pa.Schema | None:
        if name not in self._schemas and name in self._list_tables():
            self._schemas[name] = self._db.open_table(name).schema
        return self._schemas.get(name)

    def _open_or_create(self, name: str, schema: pa.Schema) -> Any:
        tbl = self._tables.get(name)
        if tbl is None:
            if name in self._list_tables():
                tbl = self._db.open_table(name)
            else:
                tbl = self._db.create_table(name, schema=schema, exist_ok=True)
                log.info("created LanceDB table %s at %s", name, self.uri)
            self._tables[name] = tbl
        return tbl

    def _maintain(self, name: str, tbl: Any) -> None:
        """Index and compaction are upkeep, not acknowledgement: a failure here is logged and retried later."""
        self._writes += 1
        try:
            if name not in self._indexed and name not in self.index_builds():
                if any(ix.columns == ["embedding"] for ix in tbl.list_indices()):
                    self._indexed.add(name)
                elif tbl.count_rows() >= self._index_min_rows:
                    self._start_index_build(name)
            # Not while an index is built: a compaction rewrites the fragments the build reads.
            if self._optimize_due(name) and not self.index_builds():
                self.upkeep(name)
            elif self._clock() - self._health_read_at.get(name, -HEALTH_INTERVAL_S) >= HEALTH_INTERVAL_S:
                self.health(name)  # sets the gauges
        except Exception as exc:
            log.warning("LanceDB upkeep of %s failed (%s); will try again", name, exc)

    def _optimize_due(self, name: str) -> bool:
        now = self._clock()
        last = self._optimized_at.setdefault(name, now)  # a table's clock starts at its first write here
        by_writes = self._optimize_every > 0 and self._writes % self._optimize_every == 0
        by_time = self._optimize_interval_s > 0 and now - last >= self._optimize_interval_s
        return by_writes or by_time

    def _start_index_build(self, name: str) -> None:
        def build() -> None:
            began = time.monotonic()
            try:
                tbl = self._db.open_table(name)
                rows = tbl.count_rows()
                tbl.create_index(metric="cosine", vector_column_name="embedding")
            except Exception as exc:
                log.warning("building the ANN index of %s failed (%s); the next write tries again", name, exc)
                return
            self._indexed.add(name)
            log.info("built the ANN index of %s (%d rows) in %.1f s", name, rows, time.monotonic() - began)

        thread = threading.Thread(target=build, name=f"lancedb-index-{name}", daemon=True)
        self._building[name] = thread
        thread.start()


def model_of_rows(table: pa.Table) -> tuple[str, str]:
    """(model name, version) from the columns: admitted rows carry no schema metadata."""
    return str(table.column("model_name")[0]), str(table.column("model_version")[0])


def _open(settings: Settings) -> LanceStore:
    s = settings.sink
    return LanceStore(
        s.lancedb_uri, s.index_min_rows, optimize_every=s.optimize_every, optimize_interval_s=s.optimize_interval_s
    )


def connect_reader(uri: str) -> Any:
    """A connection whose tables check for new versions on every read: a reader beside a sink sees each
    write as soon as it is committed (the default keeps a table at the version it was opened at)."""
    from datetime import timedelta

    return _import_lancedb().connect(uri, read_consistency_interval=timedelta(0))


# ``--lancedb-uri`` is shared with ``search``, so the CLI adds it to both.
register_store(
    StoreKind("lancedb", "merge rows into a LanceDB table per model version; ANN index once large enough", _open)
)
