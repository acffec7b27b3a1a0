"""Read what the workers published: Arrow rows from the output topic and dead letters, from the start."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa

from embedstream.config import KafkaSettings
from embedstream.consume.deadletter import REASON
from embedstream.kafka_io import make_reader
from embedstream.sinks.arrow_codec import decode_embeddings
from embedstream.topic_reader import assign_all


@dataclass
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]

    @property
    def reason(self) -> str:
        return self.headers.get(REASON, b"?").decode()


@dataclass
class Readback:
    tables: list[pa.Table] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # (message timestamp ms, rows) per output message, for latency.
    output_times: list[tuple[int, pa.Table]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables)

    def table(self) -> pa.Table:
        return pa.concat_tables(self.tables) if self.tables else pa.table({})


class TopicReader:
    """A group-less consumer over every partition of the settings' output and dead-letter topics."""

    def __init__(self, k: KafkaSettings, read_committed: bool = False) -> None:
        self._out, self._dlq = k.output_topic, k.dead_letter_topic
        self._consumer = make_reader(
            k, auto_offset_reset="earliest", read_committed=read_committed, settings_fetch_sizes=False
        )
        assign_all(self._consumer, (self._out, self._dlq))
        self.result = Readback()

    def poll(self, timeout_s: float = 0.5) -> int:
        """Read what has arrived; returns how many input messages it accounted for (rows + dead letters)."""
        got = 0
        for tp, records in self._consumer.poll(timeout_ms=int(timeout_s * 1000)).items():
            for rec in records:
                if tp.topic == self._out:
                    table = decode_embeddings(rec.value)
                    self.result.tables.append(table)
                    self.result.output_times.append((rec.timestamp, table))
                    got += table.num_rows
                else:
                    headers = {k: v for k, v in rec.headers or []}
                    self.result.dead_letters.append(DeadLetter(rec.key, rec.value, headers))
                    got += 1
        return got

    def read_until(self, total: int, timeout_s: float) -> Readback:
        deadline = time.monotonic() + timeout_s
        seen = self.result.rows + len(self.result.dead_letters)
        while seen < total and time.monotonic() < deadline:
            seen += self.poll()
        return self.result

    def close(self) -> None:
        self._consumer.close()
