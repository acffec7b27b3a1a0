"""The rollout's document and steps, the readers that resolve an alias, and LanceDB upkeep, on real embedded
LanceDB directories. No broker: the Kafka side (start, status, the switch's lag check) is measured in
tests/integration/test_rollout.py; here the switch's checks take their measures as functions."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from embedstream.aliases import Alias, Deployed, ModelRef, RolloutState, load, resolve, save, state_location
from embedstream.errors import ConfigError
from embedstream.rollout import steps
from embedstream.rollout.local_workers import Stopped
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.stores.sample_rows import sample_messages

pytest.importorskip("lancedb")

V1 = ModelRef(model_name="enc", model_version="1")
V2 = ModelRef(model_name="enc-r2", model_version="2")
DIM = 16


def _fill(store, model: ModelRef, rows: int = 120, per_message: int = 10, seed: int = 0) -> None:
    """Rows as a sink writes them: one write per message, so every write leaves a fragment."""
    for m in sample_messages(
        rows, per_message, DIM, model_name=model.model_name, model_version=model.model_version, seed=seed
    ):
        store.write([store.admit(decode_embeddings(m.value))])


def _with_candidate(location: str) -> None:
    state = RolloutState(
        aliases={
            "a": Alias(
                serving=Deployed(model=V1, group_id="g1", topics=["in"]),
                candidate=Deployed(model=V2, group_id="g2", topics=["in"]),
            )
        }
    )
    save(location, state, 0)


def test_the_document_round_trips_and_refuses_a_stale_write(tmp_path):
    location = state_location(str(tmp_path / "db"))
    assert location.endswith("/_rollout.json") and load(location).aliases == {}
    _with_candidate(location)
    assert resolve(location, "a") == V1
    stale = load(location)
    steps.switch(location, "a")
    with pytest.raises(ConfigError, match="changed under this command"):
        save(location, stale, stale.revision)
    with pytest.raises(ConfigError, match="no rollout alias 'b'"):
        resolve(location, "b")
    assert ModelRef.parse("ts-autoencoder-w32c3:2") == ModelRef(model_name="ts-autoencoder-w32c3", model_version="2")
    assert V2.table == "enc-r2-v2"


def test_a_reader_sees_one_whole_version_across_many_switches(tmp_path):
    location = str(tmp_path / "rollout.json")
    _with_candidate(location)
    seen: list[ModelRef] = []
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(resolve(location, "a"))
            except Exception as exc:  # a torn document would show up here
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    steps.switch(location, "a")
    for _ in range(100):
        steps.rollback(location, "a")
    done.set()
    reader.join()
    assert errors == [] and set(seen) <= {V1, V2} and len(seen) > 0
    assert load(location).revision == 102


def test_switch_waits_for_lag_and_coverage_then_rollback_and_retire(tmp_path):
    from embedstream.stores.lance_store import LanceStore

    store = LanceStore(str(tmp_path / "db"))
    location = state_location(store.uri)
    _with_candidate(location)
    _fill(store, V1, 120)
    _fill(store, V2, 60, seed=1)

    def rows(m: ModelRef) -> int:
        return store.open(m.table).count_rows()

    with pytest.raises(ConfigError, match="3 input records behind"):
        steps.switch(location, "a", lag=lambda d: 3, rows=rows)
    with pytest.raises(ConfigError, match="60 stored rows"):
        steps.switch(location, "a", lag=lambda d: 0, rows=rows)
    assert resolve(location, "a") == V1  # a refused switch changes nothing
    steps.switch(location, "a", lag=lambda d: 2, rows=rows, max_lag=2, min_coverage=0.5)
    assert resolve(location, "a") == V2
    steps.rollback(location, "a")
    assert resolve(location, "a") == V1
    with pytest.raises(ConfigError, match="already serves"):
        steps.start(location, "a", V1, "g1", ["in"], None)  # type: ignore[arg-type]

    # Retire the kept version: its table stays for the retention, then the next retire drops it.
    signalled: list[int] = []

    def stop(target):
        signalled.extend(w.pid for w in target.workers)
        return Stopped([w.pid for w in target.workers], [])

    done = steps.retire(
        location,
        "a",
        retention_s=60,
        drop_table=lambda m: store.drop(m.table),
        stop=stop,
        now=1000.0,
    )
    assert done.retired == V2 and done.dropped == [] and V2.table in store.table_names()
    assert signalled == [] and done.group_id == "g2"  # no workers launched here for it
    with pytest.raises(ConfigError, match="no earlier version"):
        steps.rollback(location, "a")
    done = steps.retire(location, "a", retention_s=60, drop_table=lambda m: store.drop(m.table), stop=stop, now=1061.0)
    assert done.retired is None and done.dropped == [V2]
    assert store.table_names() == [V1.table] and resolve(location, "a") == V1
    actions = [e.action for e in load(location).alias("a").history]
    assert actions == ["switch", "rollback", "retire", "drop"]


def test_a_second_switch_retires_the_version_kept_before(tmp_path):
    location = str(tmp_path / "rollout.json")
    _with_candidate(location)
    steps.switch(location, "a")
    state = load(location)
    v3 = ModelRef(model_name="enc-r3", model_version="3")
    state.aliases["a"].candidate = Deployed(model=v3, group_id="g3", topics=["in"])
    save(location, state, state.revision)
    entry = steps.switch(location, "a")
    assert entry.serving.model == v3 and entry.previous is not None and entry.previous.model == V2
    assert [r.model for r in entry.retired] == [V1]


def test_search_by_alias_answers_from_the_serving_version_only(tmp_path):
    from embedstream.ops.search import AliasReader
    from embedstream.stores.lance_store import LanceStore

    store = LanceStore(str(tmp_path / "db"))
    _fill(store, V1, 80)
    _fill(store, V2, 80, seed=1)
    location = state_location(store.uri)
    _with_candidate(location)
    reader = AliasReader(store.uri)
    for expected, step in ((V1, None), (V2, steps.switch), (V1, steps.rollback)):
        if step is not None:
            step(location, "a")
        model, hits = reader.search_by_id("a", "row-0000003", 5)
        assert model == expected and len(hits) == 5
        assert {(h.row["model_name"], h.row["model_version"]) for h in hits} == {
            (expected.model_name, expected.model_version)
        }
    # Rows written after the reader opened the table are found: it reads the latest version.
    _fill(store, V1, 90, seed=2)
    _, table = reader.table("a")
    assert table.count_rows() == 90  # rows 0..89, the first 80 replaced


def test_compare_counts_rows_and_neighbour_overlap(tmp_path):
    from embedstream.rollout.compare import compare
    from embedstream.stores.lance_store import LanceStore

    store = LanceStore(str(tmp_path / "db"))
    _fill(store, V1, 100)
    _fill(store, V2, 90)  # the same seed: the same vectors for the first 90 ids
    result = compare(store.open(V1.table), store.open(V2.table), k=5, sample=20)
    assert (result.rows_old, result.rows_new, result.ids_only_old, result.ids_only_new) == (100, 90, 10, 0)
    assert result.sample == 20 and result.scores is None  # image rows carry no anomaly score
    assert 0.0 <= result.overlap_min <= result.overlap_mean <= 1.0
    assert result.overlap_mean > 0.5  # 90 of the 100 ids, identical vectors: most neighbours agree


def test_upkeep_compacts_on_a_schedule_and_reports_fragments_and_index_lag(tmp_path):
    from embedstream import metrics
    from embedstream.stores.lance_store import LanceStore

    now = [0.0]
    store = LanceStore(str(tmp_path / "db"), optimize_every=0, optimize_interval_s=30.0, clock=lambda: now[0])
    _fill(store, V1, 200, per_message=10)
    health = store.health(V1.table)
    assert (health.rows, health.fragments, health.indexed, health.unindexed_rows) == (200, 20, False, 200)
    assert metrics.LANCEDB_FRAGMENTS.labels(V1.table)._value.get() == 20
    now[0] = 31.0  # the next write is due its upkeep
    _fill(store, V1, 10, per_message=10, seed=3)
    assert store.health(V1.table).fragments == 1
    report = store.upkeep(V1.table)
    assert report.before.fragments == 1 and report.after.rows == 200

    built = LanceStore(str(tmp_path / "db2"), index_min_rows=256, optimize_every=0, optimize_interval_s=0)
    _fill(built, V1, 512, per_message=64)
    built.close()  # waits for the index build
    _fill(built, V1, 64, per_message=64, seed=9)  # 64 rows replaced: new rows the index lacks
    health = built.health(V1.table)
    assert health.indexed and health.unindexed_rows > 0
    assert built.upkeep(V1.table).after.unindexed_rows == 0


def test_the_cli_switches_and_rolls_back_by_alias(tmp_path, capsys):
    from embedstream.cli import main
    from embedstream.stores.lance_store import LanceStore

    store = LanceStore(str(tmp_path / "db"))
    _fill(store, V1, 40)
    _fill(store, V2, 40, seed=1)
    _with_candidate(state_location(store.uri))
    common = ["--lancedb-uri", store.uri, "--alias", "a"]
    assert main(["rollout", "switch", *common, "--force"]) == 0
    assert main(["search", "--lancedb-uri", store.uri, "--alias", "a", "--id", "row-0000001", "-k", "3"]) == 0
    assert "in enc-r2-v2" in capsys.readouterr().out
    assert main(["rollout", "rollback", *common]) == 0
    assert main(["rollout", "status", *common]) == 0
    out = capsys.readouterr().out
    assert "'serving': 'enc:1'" in out and "40 rows in LanceDB table enc-v1" in out
    assert main(["upkeep", "--lancedb-uri", store.uri, "--table", V1.table]) == 0
    assert "enc-v1: 4 -> 1 fragments" in capsys.readouterr().out
    assert main(["rollout", "rollback", *common]) == 0  # back to enc-r2 (rollback swaps)
    assert main(["rollout", "compare", *common, "-k", "3", "--sample", "5"]) == 0
    assert "3-NN overlap over 5 ids" in capsys.readouterr().out
    assert resolve(state_location(store.uri), "a") == V2


def test_score_drift_reads_the_time_series_reconstruction_error(tmp_path):
    import lancedb
    import pyarrow as pa

    from embedstream.rollout.compare import score_drift

    db = lancedb.connect(str(tmp_path / "db"))
    ids = [f"w{i}" for i in range(50)]
    error = np.linspace(0.0, 1.0, 50, dtype=np.float32)

    def table(name: str, scores: np.ndarray, threshold: float):
        return db.create_table(
            name, pa.table({"id": ids, "reconstruction_error": scores, "anomaly": scores > threshold})
        )

    old, new = table("old", error, 0.9), table("new", error * 2, 1.0)
    drift = score_drift(old, new, ids[::2])
    assert drift is not None and drift.column == "reconstruction_error"
    assert drift.mean_new == pytest.approx(2 * drift.mean_old, rel=1e-5)
    assert drift.rank_correlation == pytest.approx(1.0, abs=1e-9)  # the same order, scaled
    assert drift.flagged_old == pytest.approx(0.08, abs=1e-9) and drift.flagged_new == pytest.approx(0.48, abs=1e-9)


def test_the_gauges_read_the_table_as_written_and_after_another_process_compacted_it(tmp_path):
    """Before any upkeep of its own, and whoever compacted the table last (`embedstream upkeep` elsewhere)."""
    from embedstream import metrics
    from embedstream.stores.lance_store import HEALTH_INTERVAL_S, LanceStore

    now = [0.0]
    sink = LanceStore(str(tmp_path / "db"), optimize_every=0, optimize_interval_s=0, clock=lambda: now[0])
    fragments = metrics.LANCEDB_FRAGMENTS.labels(V2.table)
    _fill(sink, V2, 30, per_message=10)
    assert fragments._value.get() == 1  # read on the first write, not only after a compaction
    _fill(sink, V2, 30, per_message=10, seed=4)  # within the interval: not read again
    assert fragments._value.get() == 1
    now[0] = HEALTH_INTERVAL_S
    _fill(sink, V2, 10, per_message=10, seed=5)
    written = fragments._value.get()
    assert written == sink.health(V2.table).fragments > 1
    LanceStore(str(tmp_path / "db")).upkeep(V2.table)  # another process compacts it
    now[0] = 2 * HEALTH_INTERVAL_S
    _fill(sink, V2, 10, per_message=10, seed=6)
    assert fragments._value.get() < written
