"""Output topics into stores: ``embedstream sink lancedb|feast`` and ``embedstream search``.

Data flow: output topic (Arrow IPC messages) -> ``sink.StoreSink`` (consumer group, decode, check,
gather) -> a ``Store`` (``lance_store.LanceStore`` or ``feast_store.FeastStore``) -> offsets committed
once the store acknowledged the write. Writes are upserts keyed by (row id, model name, model
version), so re-reading a range (a restart, a rebalance, a replay) stores each embedding once.
"""
