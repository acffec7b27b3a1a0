"""A model rollout end to end on the real local broker, Triton and stores: a refitted time-series
autoencoder (v2) beside the one serving (v1), backfilled from the start of the input topic, switched to
and rolled back, while LanceDB and Feast readers ask by alias the whole time.

v1 and v2 are two autoencoders fitted on the same normal data with different seeds and lengths (a
refit), served side by side by one Triton; each has its own worker group on the same input topic and
writes into the same output topic (rows carry their model version); one `sink lancedb` and one `sink
feast` store both versions. A v2 worker is SIGKILLed mid-backfill. The counts (searches per phase,
errors, mixed results) and the upkeep figures are printed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from embedstream.aliases import ModelRef, resolve, state_location
from embedstream.cli import main
from embedstream.config import Settings, dump_toml, load_settings
from embedstream.local.stack.process import ChildProcess
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.training import synthetic

from .helpers import produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 600  # input windows: rows per version in each store
T = 32
ALIAS = "ts"


def _fit(root: Path, seed: int, epochs: int) -> Path:
    from embedstream.training.fit import TrainConfig, train

    series = [synthetic.normal_signal(600, np.random.default_rng(seed + i)) for i in range(8)]
    cfg = TrainConfig(window=T, seed=seed, ae_epochs=epochs)
    return train(series, root / f"fit-{seed}", ("autoencoder",), cfg)["autoencoder"]


def _settings(weights: Path, group: str, **encoder: str) -> Settings:
    return load_settings(
        encoder={"family": "autoencoder", "weights": str(weights), "max_batch_size": 32, **encoder},
        kafka={"input_topic": "ro-in", "output_topic": "ro-out", "dead_letter_topic": "ro-dlq", "group_id": group},
        batch={"max_size": 16, "max_wait_ms": 20},
    )


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> Iterator[tuple[LocalStack, Settings, Settings]]:
    from embedstream.encoders import served_model_name

    root = tmp_path_factory.mktemp("rollout")
    v1 = _settings(_fit(root, seed=0, epochs=30), "ro-v1")
    # A refit under a model name of its own: Triton serves both at once, each table keeps one version.
    v2 = _settings(
        _fit(root, seed=1, epochs=20), "ro-v2", model_name=f"{served_model_name(v1.encoder)}-refit", version="2"
    )
    with LocalStack([v1, v2], workdir=root / "stack", partitions=2) as stack:
        yield stack, *stack.all_settings


class Sink:
    """`embedstream sink STORE` on the output topic: small writes and no scheduled upkeep, so fragments pile up."""

    def __init__(self, store: str, bootstrap: str, workdir: Path) -> None:
        config = workdir / f"sink-{store}.toml"
        config.write_text(
            f'health_port = 0\n[kafka]\nbootstrap_servers = "{bootstrap}"\n'
            f'[sink]\ntopics = ["ro-out"]\ngroup_id = "ro-sink-{store}"\ndead_letter_topic = "ro-sink-dlq"\n'
            f'lancedb_uri = "{workdir / "lancedb"}"\nfeast_repo = "{workdir / "feast"}"\n'
            "batch_rows = 32\nmax_wait_ms = 50\nindex_min_rows = 100000\noptimize_every = 0\noptimize_interval_s = 0\n"
        )
        argv = [sys.executable, "-m", "embedstream", "sink", store, "--config", str(config)]
        self.proc = ChildProcess(
            f"sink {store}", argv, workdir / "logs" / f"sink-{store}.log", {**os.environ, "LANCE_LOG": "error"}
        )
        self.proc.start()


@dataclass
class Readers:
    """Searches by alias from two threads, LanceDB and Feast, each answer checked against the phase it began in."""

    lancedb_uri: str
    feast_repo: Path
    ids: list[str]
    phase: str = "v1"  # v1 | v2 (switch or rollback returned), or "moving" while one runs
    expected: dict[str, ModelRef] = field(default_factory=dict)
    searches: Counter[tuple[str, str]] = field(default_factory=Counter)  # (store, phase)
    errors: list[str] = field(default_factory=list)
    mixed: int = 0  # an answer holding rows of another version than the one it resolved
    wrong: int = 0  # an answer from another version than the phase's
    missing: int = 0  # a Feast answer without a vector for an id
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def count(self, phase: str) -> int:
        return sum(n for (_, p), n in self.searches.items() if p == phase)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, args=(f,), daemon=True) for f in (self._lancedb, self._feast)]
        for t in threads:
            t.start()
        return threads

    def _loop(self, search: Callable[[int], tuple[str, ModelRef, set[ModelRef]]]) -> None:
        i = 0
        while not self.stop.is_set():
            phase = self.phase
            try:
                store, model, answered = search(i)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                i += 1
            self.searches[(store, phase)] += 1
            self.mixed += answered != {model}
            self.wrong += phase in self.expected and model != self.expected[phase]

    def _lancedb(self, i: int) -> tuple[str, ModelRef, set[ModelRef]]:
        from embedstream.ops.search import AliasReader

        if not hasattr(self, "_alias_reader"):
            self._alias_reader = AliasReader(self.lancedb_uri)
        began = time.perf_counter()
        model, hits = self._alias_reader.search_by_id(ALIAS, self.ids[i % len(self.ids)], 5)
        self.latencies.append(time.perf_counter() - began)
        if len(hits) != 5:
            raise AssertionError(f"{len(hits)} hits")
        return (
            "lancedb",
            model,
            {ModelRef(model_name=h.row["model_name"], model_version=h.row["model_version"]) for h in hits},
        )

    def _feast(self, i: int) -> tuple[str, ModelRef, set[ModelRef]]:
        from embedstream.stores.feast_store import FeastStore

        if not hasattr(self, "_feast_store"):
            self._feast_store = FeastStore(self.feast_repo)
        ids = [self.ids[(i * 7 + j) % len(self.ids)] for j in range(8)]
        model, vectors = self._feast_store.serving_vectors(state_location(self.lancedb_uri), ALIAS, "timeseries", ids)
        self.missing += sum(v is None for v in vectors)
        time.sleep(0.05)  # Feast's SQLite is the sinks' too: leave it room
        return "feast", model, {model}


def _table_rows(uri: str, model: ModelRef) -> list[str]:
    import lancedb

    db = lancedb.connect(uri)
    if model.table not in db.list_tables().tables:
        return []
    return [str(i) for i in db.open_table(model.table).to_arrow().column("id").to_pylist()]


def _feast_vectors(repo: Path, model: ModelRef, ids: list[str]) -> int:
    from embedstream.stores.feast_store import FeastStore

    keys = [(i, model.model_name, model.model_version) for i in ids]
    return sum(v is not None for v in FeastStore(repo).online_vectors("timeseries", keys))


def _wait(what: str, cond: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _cli(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


@pytest.mark.timeout(400)
def test_backfill_switch_and_rollback_while_readers_search(versions, tmp_path, capsys):
    from embedstream.encoders import served_model_name
    from embedstream.rollout import steps
    from embedstream.stores.feast_repo import write_repo

    stack, v1, v2 = versions
    bootstrap = stack.broker.bootstrap
    m1 = ModelRef(model_name=served_model_name(v1.encoder), model_version="1")
    m2 = ModelRef(model_name=served_model_name(v2.encoder), model_version="2")
    uri, repo = str(tmp_path / "lancedb"), tmp_path / "feast"
    write_repo(repo)
    configs = {}
    for name, s in (("v1", v1), ("v2", v2)):
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(
            dump_toml(s.model_copy(update={"sink": s.sink.model_copy(update={"lancedb_uri": uri})}))
        )

    sig = synthetic.labelled_signal(N, T, seed=21)
    windows = []
    for i, w in enumerate(sig.windows()):
        start = synthetic.START_MS + i * T * synthetic.STEP_MS  # a row's id is its series and window end
        doc = {"series_id": "sig", "values": w.tolist(), "start_ms": start, "end_ms": start + (T - 1) * 1000}
        windows.append((f"win-{i:04d}".encode(), json.dumps(doc).encode()))
    produce(bootstrap, "ro-in", windows)
    sinks = [Sink(store, bootstrap, tmp_path) for store in ("lancedb", "feast")]
    workers = [WorkerProcess(v1, tmp_path, "v1-0").start()]
    threads: list[threading.Thread] = []
    keys: list[str] = []
    readers = Readers(uri, repo, keys, expected={"v1": m1, "v2": m2})
    try:
        _wait("v1's rows in LanceDB", lambda: len(_table_rows(uri, m1)) == N)
        keys += sorted(_table_rows(uri, m1))
        _wait("v1's rows in Feast", lambda: _feast_vectors(repo, m1, keys) == N)
        _cli(
            "rollout", "start", "--config", str(configs["v2"]), "--serving-config", str(configs["v1"]), "--alias", ALIAS
        )
        assert resolve(state_location(uri), ALIAS) == m1
        threads = readers.start()

        # The backfill, with one of v2's workers SIGKILLed a third of the way through.
        began = time.monotonic()
        workers.append(WorkerProcess(v2, tmp_path, "v2-0").start())
        _wait("a third of v2's rows stored", lambda: len(_table_rows(uri, m2)) >= N // 3)
        workers[-1].kill()
        _cli("rollout", "status", "--config", str(configs["v2"]), "--alias", ALIAS, "--interval", "0.5")
        workers.append(WorkerProcess(v2, tmp_path, "v2-1").start())
        _wait("v2 caught up", lambda: steps.progress(state_location(uri), ALIAS, v2.kafka).lag == 0)
        _wait(
            "v2's rows in LanceDB and Feast",
            lambda: len(_table_rows(uri, m2)) == N and _feast_vectors(repo, m2, keys) == N,
        )
        backfill_s = time.monotonic() - began
        _cli("rollout", "status", "--config", str(configs["v2"]), "--alias", ALIAS, "--interval", "0.5")
        _cli("rollout", "compare", "--config", str(configs["v2"]), "--alias", ALIAS, "-k", "10", "--sample", "50")
        compared = capsys.readouterr().out
        print(compared)
        assert "10-NN overlap over 50 ids" in compared and "reconstruction_error: mean" in compared

        for step, lands_on in (("switch", "v2"), ("rollback", "v1")):
            readers.phase = "moving"
            _cli("rollout", step, "--config", str(configs["v2"]), "--alias", ALIAS)
            readers.phase = lands_on
            base = readers.count(lands_on)
            _wait(f"searches after the {step}", lambda p=lands_on, b=base: readers.count(p) >= b + 40)  # type: ignore[misc]
        readers.stop.set()
        for t in threads:
            t.join(30)
        print(capsys.readouterr().out)
        print(f"backfill of {N} windows by v2 (one worker SIGKILLed): {backfill_s:.1f} s")
        print(f"searches by phase: {dict(readers.searches)}; errors {len(readers.errors)}, mixed {readers.mixed}, "
              f"wrong version {readers.wrong}, Feast ids without a vector {readers.missing}")  # fmt: skip
        assert readers.errors == [] and readers.mixed == 0 and readers.wrong == 0 and readers.missing == 0
        for store in ("lancedb", "feast"):
            assert all(readers.searches[(store, phase)] > 0 for phase in ("v1", "v2")), readers.searches

        # Exactly the input's N rows per version, in each store, after the SIGKILL.
        for model in (m1, m2):
            ids = _table_rows(uri, model)
            assert len(ids) == N and set(ids) == set(_table_rows(uri, m1))
            assert _feast_vectors(repo, model, ids) == N
        with sqlite3.connect(repo / "data" / "online.db", timeout=30) as conn:
            keys_stored = conn.execute(
                "select count(distinct entity_key) from embedstream_embeddings_timeseries"
            ).fetchone()[0]
        assert keys_stored == 2 * N
    finally:
        readers.stop.set()
        for w in workers:
            w.terminate()
        for s in sinks:
            s.proc.stop()

    _upkeep_figures(uri, m1, keys, capsys)

    # Forward again, then retire v1 with no retention: its table goes, readers keep v2.
    _cli("rollout", "rollback", "--lancedb-uri", uri, "--alias", ALIAS)
    _cli("rollout", "retire", "--lancedb-uri", uri, "--alias", ALIAS, "--retention", "0")
    assert resolve(state_location(uri), ALIAS) == m2 and _table_rows(uri, m1) == []


def _upkeep_figures(uri: str, model: ModelRef, ids: list[str], capsys) -> None:
    """Fragments and by-id search latency of a table before and after `embedstream upkeep` (printed)."""
    from embedstream.ops.search import AliasReader
    from embedstream.stores.lance_store import LanceStore

    def median_ms() -> float:
        reader = AliasReader(uri)
        reader.search_by_id(ALIAS, ids[0], 10)  # opens the table
        times = []
        for i in range(60):
            began = time.perf_counter()
            reader.search_by_id(ALIAS, ids[i * 7 % len(ids)], 10)
            times.append(time.perf_counter() - began)
        return float(np.median(times)) * 1000

    store = LanceStore(uri)
    before, before_ms = store.health(model.table), median_ms()
    _cli("upkeep", "--lancedb-uri", uri, "--table", model.table)
    after, after_ms = store.health(model.table), median_ms()
    print(capsys.readouterr().out)
    print(f"{model.table}: {before.fragments} -> {after.fragments} fragments after upkeep; "
          f"search by id (k=10) median {before_ms:.2f} -> {after_ms:.2f} ms")  # fmt: skip
    assert after.fragments <= before.fragments and after.rows == before.rows == len(ids)
