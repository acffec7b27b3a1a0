from __future__ import annotations

import itertools
import os
import time
from collections import Counter

from embedstream.config import KafkaSettings
from embedstream.kafka_io import make_writer
from embedstream.local.readback import Readback, TopicReader

_counter = itertools.count()


def private_topics(settings, test_name: str, partitions: int):
    """The settings with topics and a consumer group of this test's own (created), on a shared stack."""
    from embedstream.config import Settings
    from embedstream.kafka_io import ensure_topics

    n = f"{test_name[:40]}-{next(_counter)}-{os.getpid()}".replace("[", "-").replace("]", "")
    base = settings.model_dump()
    base["kafka"].update(
        input_topic=f"in-{n}", output_topic=f"out-{n}", dead_letter_topic=f"dlq-{n}", group_id=f"g-{n}"
    )
    private = Settings(**base)
    k = private.kafka
    ensure_topics(k, {k.input_topic: partitions, k.output_topic: partitions, k.dead_letter_topic: 1})
    return private


def produce(bootstrap: str, topic: str, messages: list[tuple]) -> None:
    """Messages are (key, value) or (key, value, headers)."""
    producer = make_writer(KafkaSettings(bootstrap_servers=bootstrap), linger_ms=5, max_request_size=16 << 20)
    for key, value, *headers in messages:
        producer.send(topic, key=key, value=value, headers=headers[0] if headers else None)
    producer.flush()
    producer.close()


def read_all(settings, expected: int, timeout_s: float = 180.0) -> Readback:
    k = settings.kafka
    reader = TopicReader(k, k.delivery == "exactly_once")
    try:
        return reader.read_until(expected, timeout_s)
    finally:
        reader.close()


def wait_for_rows(settings, at_least: int, timeout_s: float = 120.0) -> int:
    k = settings.kafka
    reader = TopicReader(k, k.delivery == "exactly_once")
    try:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < at_least and time.monotonic() < deadline:
            seen += reader.poll(0.2)
        return seen
    finally:
        reader.close()


def accounting(produced_keys: list[bytes], result: Readback, among_others: bool = False) -> dict[str, int]:
    """produced / embedded / dead-lettered / duplicates / missing, by message key.

    ``among_others``: the topics also hold other tests' keys, so only the produced ones are counted.
    """
    table = result.table()
    out_keys = Counter(table.column("key").to_pylist()) if table.num_rows else Counter()
    dlq_keys = Counter(d.key for d in result.dead_letters)
    if among_others:
        wanted = set(produced_keys)
        out_keys = Counter({k: n for k, n in out_keys.items() if k in wanted})
        dlq_keys = Counter({k: n for k, n in dlq_keys.items() if k in wanted})
    seen = out_keys + dlq_keys
    return {
        "produced": len(produced_keys),
        "embedded": len(out_keys),
        "dead_lettered": len(dlq_keys),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "missing": sum(1 for k in produced_keys if k not in seen),
    }


def read_until_complete(settings, produced_keys: list[bytes], timeout_s: float = 180.0, settle_s: float = 2.0):
    """Read until every produced key is seen (as a row or a dead letter), then a little longer for late duplicates."""
    k = settings.kafka
    reader = TopicReader(k, k.delivery == "exactly_once")
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and accounting(produced_keys, reader.result)["missing"]:
            reader.poll(0.3)
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:
            reader.poll(0.3)
        return reader.result
    finally:
        reader.close()


def served_weights_fingerprint(stack, settings, spec) -> str:
    """The weights fingerprint recomputed from what the stack's Triton loads, TorchScript or ONNX."""
    import torch

    from embedstream.encoders import get_family
    from embedstream.lineage import file_sha256, module_fingerprint, weights_fingerprint

    version = stack.model_repository / spec.name / "1"
    if (version / "model.pt").exists():
        return weights_fingerprint(torch.jit.load(str(version / "model.pt")).state_dict())
    # model.onnx holds the weights as initialisers: it must be the very file exported (the sha256 the
    # backend checks at load) from the module these settings build.
    config = (stack.model_repository / spec.name / "config.pbtxt").read_text()
    assert file_sha256(version / "model.onnx") in config
    return module_fingerprint(get_family(settings.encoder.family).build(settings.encoder))


def assert_serves_checked_onnx(stack, exporter: str) -> None:
    """Every model of the stack is served as a ``model.onnx`` that export held to torch eager."""
    import json

    for spec in stack.specs:
        version = stack.model_repository / spec.name / "1"
        assert (version / "model.onnx").is_file() and not (version / "model.pt").exists()
        check = json.loads((version / "onnx_check.json").read_text())
        diff, cos = check["max_abs_diff"], check["min_cosine"]
        print(f"{spec.name} ({check['exporter']} exporter): ONNX vs eager max abs diff {diff:.2e}, cosine {cos}")
        assert diff < 1e-4 and cos > 0.9999
        assert check["exporter"] == exporter
