"""Output topics into stores: ``embedstream sink <store>`` and ``embedstream search``.

Data flow: output topic (Arrow IPC messages) -> the consume loop (``consume/``) with ``sink.StoreStage``
plugged in (decode, admit, gather by rows) -> a ``Store`` (``lance_store.LanceStore``,
``feast_store.FeastStore``; each registers itself, ``registry.py``) -> offsets committed once the
store acknowledged the write. Writes are upserts keyed by (row id, model name, model version), so
re-reading a range (a restart, a rebalance, a replay) stores each embedding once.
"""
