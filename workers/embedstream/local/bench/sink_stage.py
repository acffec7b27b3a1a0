"""The bench's sink stage: ``sink lancedb`` rows/s beside kafka-python's raw consume of the same topic.

Output messages as a worker writes them (``stores.sample_rows``: the modality's embedding width, a
batch's rows per message) go onto a topic of their own first (not timed). Then, on that topic:

- raw consume: one kafka-python consumer outside any group reads every message, nothing else (the
  most one process can read here);
- the sink: ``StoreSink`` as ``embedstream sink lancedb`` runs it (its consumer group, Arrow decode,
  checks, merge into a fresh LanceDB table, commit after the store acknowledged), timed from the
  group's assignment to the last row acknowledged.

The ratio says how much of the read rate the store's side leaves; its rows are the stage's count.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from embedstream.config import Settings
from embedstream.kafka_io import ensure_topics
from embedstream.local.bench.report import StageResult, ratio
from embedstream.local.bench.stages import Clock, Progress, no_progress, produce_burst, raw_consume
from embedstream.stores.sample_rows import sample_messages

WAIT_TIMEOUT_S = 300.0


def sink_settings(settings: Settings, topic: str, lancedb_uri: Path) -> Settings:
    """The sink's defaults (batch rows, wait) on one topic, a group and a table of the stage's own."""
    sink = settings.sink.model_copy(
        update={
            "topics": (topic,),
            "group_id": f"{topic}-sink",
            "dead_letter_topic": f"{topic}-dlq",
            "lancedb_uri": str(lancedb_uri),
        }
    )
    return settings.model_copy(update={"sink": sink})


def sink_lancedb(
    settings: Settings,
    topic: str,
    rows: int,
    dim: int,
    rows_per_message: int,
    workdir: Path,
    partitions: int,
    clock: Clock,
    progress: Progress,
) -> StageResult:
    from embedstream.stores.service import create_sink

    k = settings.kafka
    ensure_topics(k, {topic: partitions})
    messages = sample_messages(rows, rows_per_message, dim, model_name=f"bench-sink-{dim}d")
    produce_burst(k, topic, [(m.key, m.value) for m in messages], time.time)
    raw = raw_consume(settings, topic, len(messages), clock, no_progress)

    uri = workdir / "bench-lancedb" / topic
    shutil.rmtree(uri, ignore_errors=True)
    sink = create_sink("lancedb", sink_settings(settings, topic, uri))
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:  # raised below, in the bench's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="bench-sink", daemon=True)
    thread.start()
    try:
        deadline = clock() + WAIT_TIMEOUT_S
        while sink.assigned is None and not failed:  # the group's join is not the sink's rate
            if clock() > deadline:
                raise TimeoutError("the bench sink was not assigned its partitions")
            time.sleep(0.01)
        start = clock()
        done = 0
        while done < rows and not failed:
            stored = sink.stats.rows_stored
            if stored > done:
                progress(stored - done)
                done = stored
            if clock() > deadline:
                raise TimeoutError(f"the bench sink stored {done} of {rows} rows in {WAIT_TIMEOUT_S:.0f} s")
            time.sleep(0.005)
        seconds = clock() - start
    finally:
        stop.set()
        thread.join(timeout=60)
        sink.close()
    if failed:
        raise failed[0]
    raw_rows_per_s = ratio(rows, raw.seconds)
    return StageResult(
        done,
        seconds,
        {
            "messages_on_topic": len(messages),
            "rows_per_message": rows_per_message,
            "dim": dim,
            "writes": sink.stats.writes,
            "raw_consume_seconds": raw.seconds,
            "raw_consume_rows_per_s": raw_rows_per_s,
            "vs_raw_consume": ratio(ratio(done, seconds), raw_rows_per_s),
        },
    )
