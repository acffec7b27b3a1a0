"""Feast: rows into the online store of a repository from ``embedstream sink feast init``.

Through ``FeatureStore.write_to_online_store``, Feast's online write, not a push source: a push to
the offline store appends to its files, so a replay would duplicate rows there, while the online
write is an upsert per entity key (row id, model name, model version), which is what makes the sink
idempotent. Training data comes from the output topic or the offline store a batch job fills.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from embedstream.errors import ConfigError
from embedstream.stores.base import KEY_COLUMNS, Refusal, StoreUnavailable, check_rows, latest_per_key, modality_of
from embedstream.stores.feast_repo import view_name
from embedstream.stores.registry import StoreKind, register_store

if TYPE_CHECKING:
    from embedstream.config import Settings

log = logging.getLogger(__name__)


def _import_feast() -> Any:
    try:
        import feast
    except ImportError:
        raise ConfigError("the Feast sink needs feast: pip install 'embedstream[sinks]'") from None
    return feast


class FeastStore:
    name = "feast"

    def __init__(self, repo: Path) -> None:
        if not (repo / "feature_store.yaml").is_file():
            raise ConfigError(f"no Feast repository at {repo}: create one with `embedstream sink feast init {repo}`")
        self.repo = repo
        self._store = _import_feast().FeatureStore(repo_path=str(repo))
        self._views: dict[str, list[str] | None] = {}  # view name -> feature columns (None: not in the repo)
        self._announced: set[str] = set()

    def admit(self, table: pa.Table) -> pa.Table | Refusal:
        """Raises StoreUnavailable when the registry cannot be read."""
        refused = check_rows(table)
        if refused is not None:
            return refused
        name = view_name(modality_of(table) or "unknown")
        features = self._features(name)
        if features is None:
            return Refusal("store_rejected", f"the Feast repository {self.repo} has no feature view {name!r}")
        columns: dict[str, pa.Array | pa.ChunkedArray] = {c: table.column(c) for c in (*KEY_COLUMNS, "event_time")}
        for f in features:
            # A feature this model does not produce (e.g. an LSTM's missing anomaly score) is stored as null.
            columns[f] = table.column(f) if f in table.column_names else pa.nulls(table.num_rows)
        rows = pa.table(columns)
        return rows.replace_schema_metadata({b"embedstream.feast_view": name.encode()})

    def write(self, tables: list[pa.Table]) -> int:
        by_view: dict[str, list[pa.Table]] = {}
        for t in tables:
            if t.num_rows:
                by_view.setdefault((t.schema.metadata or {})[b"embedstream.feast_view"].decode(), []).append(t)
        written = 0
        for name, parts in by_view.items():
            rows = latest_per_key(pa.concat_tables(parts))
            try:
                self._store.write_to_online_store(name, df=rows.to_pandas())
            except Exception as exc:  # admitted rows: a failure is the store's, not theirs
                raise StoreUnavailable(f"Feast online write to {name!r} ({self.repo}) failed: {exc}") from exc
            written += rows.num_rows
            if name not in self._announced:  # once per view and process: a user sees where rows go
                self._announced.add(name)
                log.info("stored the first %d rows in Feast feature view %s (%s)", rows.num_rows, name, self.repo)
        return written

    def online_vectors(self, modality: str, keys: list[tuple[str, str, str]]) -> list[list[float] | None]:
        """The stored embeddings of (id, model name, model version) keys, through ``get_online_features``."""
        name = view_name(modality)
        entity_rows = [dict(zip(KEY_COLUMNS, key, strict=True)) for key in keys]
        result = self._store.get_online_features(features=[f"{name}:embedding"], entity_rows=entity_rows).to_dict()
        return list(result["embedding"])

    def serving_vectors(
        self, state_location: str, alias: str, modality: str, ids: list[str]
    ) -> tuple[Any, list[list[float] | None]]:
        """The embeddings of ``ids`` by the version serving ``alias`` (``embedstream/aliases.py``), resolved once for
        the whole request: every vector of one answer comes from one version. Returns (version, vectors)."""
        from embedstream.aliases import resolve

        model = resolve(state_location, alias)
        keys = [(i, model.model_name, model.model_version) for i in ids]
        return model, self.online_vectors(modality, keys)

    def close(self) -> None:
        return None

    def _features(self, name: str) -> list[str] | None:
        if name not in self._views:
            from feast.errors import FeatureViewNotFoundException

            try:
                view = self._store.get_feature_view(name)
            except FeatureViewNotFoundException:
                self._views[name] = None
            except Exception as exc:  # the registry itself: an outage, not a verdict on the rows
                raise StoreUnavailable(f"Feast registry of {self.repo} unreadable: {exc}") from exc
            else:
                self._views[name] = [f.name for f in view.features]
        return self._views[name]


def _open(settings: Settings) -> FeastStore:
    return FeastStore(Path(settings.sink.feast_repo))


def _flags(s: argparse.ArgumentParser) -> None:
    from embedstream.cli_support import flag

    s.add_argument("action", nargs="?", choices=["init"], help="init: write and apply a Feast repository")
    s.add_argument("dir", nargs="?", help="with init: the repository directory to write")
    s.add_argument("--no-apply", action="store_true", help="with init: write the files, do not register them")
    flag(s, "--feast-repo", "SINK__FEAST_REPO", "Feast repository (overrides [sink] feast_repo)")


def _init(args: argparse.Namespace) -> int | None:
    """``sink feast init DIR``: write (and register) the repository instead of running the sink."""
    if args.action != "init":
        return None
    from embedstream.stores.feast_repo import write_repo

    if not args.dir:
        raise ConfigError("sink feast init needs the repository directory: embedstream sink feast init DIR")
    for path in write_repo(Path(args.dir), apply=not args.no_apply):
        print(f"wrote {path}")
    print(
        f"{'registered' if not args.no_apply else 'not registered'}: feature views embeddings_image, "
        f"embeddings_text, embeddings_timeseries; run the sink with --feast-repo {args.dir}"
    )
    return 0


register_store(
    StoreKind(
        "feast",
        "write rows into a Feast online store; `sink feast init DIR` writes the repository",
        _open,
        _flags,
        _init,
    )
)
