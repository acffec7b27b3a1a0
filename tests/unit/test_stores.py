"""LanceStore on a real embedded LanceDB directory: upserts on the idempotency key, the ANN index built
beside the writes, search over what was stored. No broker: the rows are output messages as a worker
writes them (``stores.sample_rows``), decoded as the sink decodes them."""

from __future__ import annotations

import numpy as np
import pytest

from embedstream.ops.search import nearest, search_by_id, table_model, vector_of
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.stores.base import Refusal
from embedstream.stores.sample_rows import sample_messages

lancedb = pytest.importorskip("lancedb")

DIM = 32


def _admitted(store, messages):
    out = []
    for m in messages:
        verdict = store.admit(decode_embeddings(m.value))
        assert not isinstance(verdict, Refusal), verdict
        out.append(verdict)
    return out


def test_writes_are_upserts_and_the_index_is_built_beside_them(tmp_path):
    from embedstream.stores.lance_store import LanceStore

    messages = sample_messages(1200, 50, DIM, model_name="m")
    store = LanceStore(str(tmp_path / "db"), index_min_rows=1024)
    written = sum(store.write(_admitted(store, messages[i : i + 4])) for i in range(0, len(messages), 4))
    assert written == 1200
    # The write that crossed index_min_rows returned without waiting for the build.
    building = store.index_builds()
    # A replay of the whole range while the index may still be building: each row stays once.
    assert store.write(_admitted(store, messages)) == 1200
    store.close()  # waits for the build
    assert store.index_builds() == []
    table = LanceStore(str(tmp_path / "db")).open("m-v1")
    ids = table.to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 1200
    assert any(ix.columns == ["embedding"] for ix in table.list_indices()), building
    # Every stored vector is the one published; a row's nearest other rows exclude itself.
    want = {i: v for m in messages for i, v in zip(m.ids, m.vectors, strict=True)}
    assert np.array_equal(vector_of(table, "row-0000007"), want["row-0000007"])
    hits = search_by_id(table, "row-0000007", 5)
    assert len(hits) == 5 and "row-0000007" not in {h.id for h in hits}
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    model = table_model(table)
    assert (model.name, model.version, model.dim) == ("m", "1", DIM)


def test_exact_search_finds_a_stored_vector_first(tmp_path):
    from embedstream.stores.lance_store import LanceStore

    messages = sample_messages(300, 30, DIM, model_name="m", seed=5)
    store = LanceStore(str(tmp_path / "db"))  # below index_min_rows: an exact scan
    store.write(_admitted(store, messages))
    table = store.open("m-v1")
    target = messages[3].vectors[2]
    (hit,) = nearest(table, target, 1)
    assert hit.id == messages[3].ids[2] and hit.distance < 1e-5


def test_a_second_model_version_gets_a_table_of_its_own(tmp_path):
    from embedstream.stores.lance_store import LanceStore

    store = LanceStore(str(tmp_path / "db"))
    v1 = sample_messages(64, 32, DIM, model_name="m", model_version="1")
    v2 = sample_messages(64, 32, DIM, model_name="m", model_version="2", seed=1)
    store.write(_admitted(store, v1) + _admitted(store, v2))
    assert store.table_names() == ["m-v1", "m-v2"]
    assert [store.open(n).count_rows() for n in store.table_names()] == [64, 64]
