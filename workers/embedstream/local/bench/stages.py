"""The measurements: bare model, Triton alone, the pipeline (burst and paced), raw kafka-python.

Clocks are passed in (``Clocks``): ``wall`` must be epoch seconds (it is compared with Kafka record
timestamps), ``sleep`` paces the producer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer

from embedstream.config import KafkaSettings, Settings
from embedstream.encoders import get_family
from embedstream.inference.local import TorchBackend
from embedstream.inference.triton import TritonBackend
from embedstream.kafka_io import make_producer, make_reader, make_writer
from embedstream.local.bench.report import StageResult
from embedstream.local.readback import TopicReader
from embedstream.local.samples.traffic import Message
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.service import encoder_spec
from embedstream.topic_reader import assign_all

Clock = Callable[[], float]
Progress = Callable[[int], None]
Batches = Sequence[tuple[np.ndarray, ...]]
# Room for the largest bench images in one request, whatever the settings' producer limit.
MAX_REQUEST_BYTES = 16 << 20


@dataclass
class Clocks:
    """Injected time: ``wall`` is compared with Kafka timestamps, ``mono`` times the in-process stages."""

    wall: Clock = time.time
    mono: Clock = time.perf_counter
    sleep: Callable[[float], None] = time.sleep


def _rows(batches: Batches) -> int:
    return sum(b[0].shape[0] for b in batches)


def no_progress(_n: int) -> None:
    return None


def _eager_model(settings: Settings) -> TorchBackend:
    return TorchBackend(encoder_spec(settings), get_family(settings.encoder.family).build(settings.encoder))


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _with_batch(settings: Settings, **changes: int) -> Settings:
    return settings.model_copy(update={"batch": settings.batch.model_copy(update=changes)})


class InProcessModel(Protocol):
    def infer(self, inputs: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]: ...


# Builds the in-process model for a number of intra-op threads (torch's are set around the call).
ModelFactory = Callable[[int], InProcessModel]


def bare_model(
    settings: Settings,
    batches: Batches,
    instances: int,
    threads: int,
    clock: Clock,
    progress: Progress,
    model: ModelFactory | None = None,
) -> StageResult:
    """The model in this process: ``instances`` Python threads sharing the batches, ``threads`` each.

    It mirrors a Triton instance group (torch and ONNX Runtime release the GIL inside their
    operators). ``model`` defaults to the eager torch module.
    """
    backend = model(threads) if model is not None else _eager_model(settings)

    def run(share: Batches) -> None:
        for b in share:
            backend.infer(b)
            progress(b[0].shape[0])

    with _torch_threads(threads), ThreadPoolExecutor(instances, thread_name_prefix="bench-bare") as pool:
        # The first calls pay one-off allocations and kernel selection.
        list(pool.map(lambda _: backend.infer(batches[0]), range(instances)))
        start = clock()
        list(pool.map(run, [batches[i::instances] for i in range(instances)]))
        seconds = clock() - start
    extra = {"instances": instances, "threads": threads, "batch": settings.batch.max_size}
    return StageResult(_rows(batches), seconds, extra)


def best_bare_model(
    settings: Settings,
    batches: Batches,
    shapes: Sequence[tuple[int, int]],
    clock: Clock,
    progress: Progress,
    model: ModelFactory | None = None,
) -> StageResult:
    """The model's best in-process throughput over (instances, threads) shapes: the ceiling to compare with."""
    results = []
    for i, (instances, threads) in enumerate(shapes):
        last = i == len(shapes) - 1
        shown = progress if last else no_progress
        results.append(bare_model(settings, batches, instances, threads, clock, shown, model))
    best = max(results, key=lambda r: r.throughput)
    best.extra["tried"] = {f"{r.extra['instances']}x{r.extra['threads']}": r.throughput for r in results}
    return best


def model_latency(settings: Settings, messages: Sequence[Message], batch: int, threads: int, clock: Clock) -> float:
    """Median milliseconds the eager model takes for one batch of ``batch`` messages on ``threads`` threads.

    The model time of the latency bound: what one served instance needs for the batch it gets.
    """
    from embedstream.local.bench.workload import preprocessed_batches

    # Bench traffic has no bad messages: the first ``batch`` messages make one full batch.
    inputs = preprocessed_batches(_with_batch(settings, max_size=batch), messages[:batch])[0]
    backend = _eager_model(settings)
    with _torch_threads(threads):
        for _ in range(2):
            backend.infer(inputs)
        times = []
        for _ in range(7):
            start = clock()
            backend.infer(inputs)
            times.append(clock() - start)
    return 1000.0 * float(np.median(times))


def decode_only(settings: Settings, messages: Sequence[Message], clock: Clock) -> StageResult:
    """The worker's decode path alone (its checks and ``prepare``, the text tokenizer), one poll-sized chunk at
    a time, on one decode thread."""
    from embedstream.modalities import modality_for
    from embedstream.records import BadRecord, Deferred, SourceMessage

    one_thread = _with_batch(settings, decode_threads=1)
    modality = modality_for(encoder_spec(one_thread), one_thread)
    msgs = [SourceMessage("bench", 0, i, key, value, 0) for i, (key, value) in enumerate(messages)]
    size = one_thread.batch.max_size
    start = clock()
    for i in range(0, len(msgs), size):
        decoded = modality.decode_many(msgs[i : i + size])
        modality.prepare([d for d in decoded if not isinstance(d, (BadRecord, Deferred))])
    return StageResult(len(msgs), clock() - start, {"decode_threads": 1})


def triton_alone(settings: Settings, batches: Batches, clock: Clock, progress: Progress) -> StageResult:
    """The served model over the worker's client, ``batch.max_in_flight`` requests at a time, no Kafka."""
    spec = encoder_spec(settings)
    backend = TritonBackend(settings.triton, spec)
    in_flight = settings.batch.max_in_flight

    def one(b: tuple[np.ndarray, ...]) -> int:
        backend.infer(b)
        progress(b[0].shape[0])
        return b[0].shape[0]

    try:
        with ThreadPoolExecutor(in_flight, thread_name_prefix="bench-triton") as pool:
            # Warm every thread's client (connection set-up is not what this stage measures).
            list(pool.map(lambda _: backend.infer(batches[0]), range(in_flight)))
            start = clock()
            done = sum(pool.map(one, batches))
            seconds = clock() - start
    finally:
        backend.close()
    return StageResult(done, seconds, {"in_flight": in_flight, "protocol": settings.triton.protocol})


def _producer(k: KafkaSettings, linger_ms: int) -> KafkaProducer:
    return make_writer(k, linger_ms=linger_ms, max_request_size=MAX_REQUEST_BYTES)


def produce_burst(k: KafkaSettings, topic: str, messages: Sequence[Message], wall: Clock) -> float:
    """Everything at once; returns when producing started (epoch seconds)."""
    producer = _producer(k, linger_ms=5)
    try:
        started = wall()
        for key, value in messages:
            producer.send(topic, value=value, key=key, timestamp_ms=int(wall() * 1000))
        producer.flush()
    finally:
        producer.close()
    return started


# Below this rate a paced producer sends each message at once: lingering would add to the latency
# measured. Above it, one-message requests fall behind: at 10,000 2.1 KB messages/s with linger 0 the
# send -> consume latency through the broker alone (no worker) grew from 23 to 96 ms p50 over 20 s,
# and stayed at 25-31 ms with 5 ms (docs/benchmarks.md, "Latency at half load").
PACED_LINGER_FROM_RATE = 1000.0
PACED_LINGER_MS = 5


def paced_linger_ms(rate: float) -> int:
    """The paced producer's linger: none for a trickle, a batching producer's 5 ms for a stream."""
    return PACED_LINGER_MS if rate >= PACED_LINGER_FROM_RATE else 0


def produce_paced(
    k: KafkaSettings,
    topic: str,
    messages: Sequence[Message],
    rate: float,
    wall: Clock,
    sleep: Callable[[float], None],
    stop: threading.Event,
) -> dict[bytes, int]:
    """One message every 1/rate s on a fixed schedule (no drift); returns each key's send timestamp (ms)."""
    producer = _producer(k, linger_ms=paced_linger_ms(rate))
    sent: dict[bytes, int] = {}
    try:
        start = wall()
        for i, (key, value) in enumerate(messages):
            if stop.is_set():
                break
            delay = start + i / rate - wall()
            if delay > 0:
                sleep(delay)
            ts = int(wall() * 1000)
            producer.send(topic, value=value, key=key, timestamp_ms=ts)
            sent[key] = ts
        producer.flush()
    finally:
        producer.close()
    return sent


@dataclass
class Follower:
    """Reads one pipeline's output topic for the whole run; rows of a stage are told apart by key prefix."""

    reader: TopicReader
    worker: WorkerProcess
    # key -> output record timestamp (ms), for every row seen so far; and the same by row id, for
    # rows that share a key (the windows of one series).
    seen: dict[bytes, int] = field(default_factory=dict)
    seen_ids: dict[bytes, int] = field(default_factory=dict)
    _consumed_tables: int = 0

    def poll(self, timeout_s: float = 0.2) -> None:
        self.reader.poll(timeout_s)
        times = self.reader.result.output_times
        for ts, table in times[self._consumed_tables :]:
            for key in table.column("key").to_pylist():
                self.seen[bytes(key)] = ts
            for row_id in table.column("id").to_pylist():
                self.seen_ids[row_id.encode()] = ts
        self._consumed_tables = len(times)
        if self.reader.result.dead_letters:
            first = self.reader.result.dead_letters[0]
            raise RuntimeError(f"{self.worker.name} dead-lettered {first.key!r}: {first.reason}")

    def wait_for(
        self,
        prefix: bytes,
        count: int,
        timeout_s: float,
        progress: Progress,
        clock: Clock = time.monotonic,
        *,
        by_id: bool = False,
    ) -> dict[bytes, int]:
        """Block until ``count`` rows keyed ``prefix...`` (``by_id``: with such ids) arrived; their timestamps."""
        deadline = clock() + timeout_s
        done = 0
        while True:
            self.poll()
            seen = self.seen_ids if by_id else self.seen
            rows = {k: ts for k, ts in seen.items() if k.startswith(prefix)}
            if len(rows) > done:
                progress(len(rows) - done)
                done = len(rows)
            if done >= count:
                return rows
            raise_if_exited([self.worker])
            if clock() > deadline:
                raise TimeoutError(f"{self.worker.name}: {done} of {count} rows after {timeout_s:.0f}s")

    def close(self) -> None:
        self.reader.close()


def raise_if_exited(workers: Sequence[WorkerProcess]) -> None:
    for wp in workers:
        if not wp.alive():
            raise RuntimeError(f"{wp.name} exited; last log lines:\n{wp.tail()}")


def wait_assigned(
    workers: Sequence[WorkerProcess], wall: Clock, sleep: Callable[[float], None], timeout_s: float = 120.0
) -> float:
    """Epoch seconds at which the first of the workers reported its partitions assigned (to within 20 ms)."""
    deadline = wall() + timeout_s
    while wall() < deadline:
        if any((wp.status() or {}).get("ready") for wp in workers):
            return wall()
        raise_if_exited(workers)
        sleep(0.02)
    names = ", ".join(wp.name for wp in workers)
    raise TimeoutError(f"none of {names} was assigned its partitions within {timeout_s:.0f}s")


def wait_embedded(
    workers: Sequence[WorkerProcess],
    count: int,
    timeout_s: float,
    progress: Progress,
    sleep: Callable[[float], None],
    start: int = 0,
    clock: Clock = time.monotonic,
) -> None:
    """Block until the workers' ``embedded`` counters add up to ``count``, asking each /readyz 10 times a second.

    A worker that does not answer in time keeps its last figure; ``start`` is where the progress
    shown begins.
    """
    deadline = clock() + timeout_s
    shown = start
    last = [0] * len(workers)
    while True:
        for i, wp in enumerate(workers):
            status = wp.status()
            if status is not None:
                last[i] = int(status.get("embedded", last[i]))
        embedded = sum(last)
        if embedded > shown:
            progress(embedded - shown)
            shown = embedded
        if embedded >= count:
            return
        raise_if_exited(workers)
        if clock() > deadline:
            names = ", ".join(wp.name for wp in workers)
            raise TimeoutError(f"{names}: {embedded - start} of {count - start} rows after {timeout_s:.0f}s")
        sleep(0.1)


def wait_group_settled(
    group: Sequence[WorkerProcess],
    partitions: int,
    wall: Clock,
    sleep: Callable[[float], None],
    timeout_s: float = 120.0,
) -> None:
    """Block until every member owns partitions and together they own each of ``partitions`` once."""
    deadline = wall() + timeout_s
    while wall() < deadline:
        owned = [(wp.status() or {}).get("assigned") or [] for wp in group]
        flat = [p for parts in owned for p in parts]
        if all(owned) and len(flat) == len(set(flat)) == partitions:
            return
        raise_if_exited(group)
        sleep(0.1)
    raise TimeoutError(f"a group of {len(group)} workers did not settle on {partitions} partitions in {timeout_s:.0f}s")


def worker_counters(worker: WorkerProcess) -> tuple[int, int]:
    """(embedded, batches) from the worker's /readyz."""
    status = worker.status() or {}
    return int(status.get("embedded", 0)), int(status.get("batches", 0))


def raw_kafka(
    settings: Settings, topics: tuple[str, str], messages: Sequence[Message], clock: Clock, progress: Progress
) -> StageResult:
    """One consumer reading the N messages and one producer writing N messages of the same size.

    The messages are put on the input topic first (not timed); the producer is the worker's
    (``make_producer``: acks=all, idempotent, same linger), the consumer reads every partition
    without a group, as fast as it can, sending each value on as it arrives.
    """
    k = settings.kafka
    src, dst = topics
    produce_burst(k, src, messages, time.time)
    consumer = _read_from_start(settings, src)
    producer = make_producer(k, "embedstream-bench-raw")
    try:
        total = len(messages)
        done = 0
        start = clock()
        while done < total:
            for records in consumer.poll(timeout_ms=500).values():
                for rec in records:
                    producer.send(dst, value=rec.value, key=rec.key)
                done += len(records)
                progress(len(records))
            if clock() - start > 300:
                raise TimeoutError(f"raw kafka read {done} of {total} messages in 300 s")
        producer.flush()
        seconds = clock() - start
    finally:
        consumer.close()
        producer.close()
    size = sum(len(v) for _, v in messages) / max(1, len(messages))
    return StageResult(done, seconds, {"mean_message_bytes": size})


def raw_consume(settings: Settings, topic: str, count: int, clock: Clock, progress: Progress) -> StageResult:
    """One consumer reading ``count`` messages already on ``topic`` (raw_kafka's input), nothing else.

    The most one kafka-python process can read here: a model faster than this cannot be kept busy
    by one worker, whatever the worker does with the messages.
    """
    consumer = _read_from_start(settings, topic)
    try:
        done = 0
        start = clock()
        while done < count:
            got = sum(len(records) for records in consumer.poll(timeout_ms=500).values())
            done += got
            progress(got)
            if clock() - start > 300:
                raise TimeoutError(f"raw consume read {done} of {count} messages in 300 s")
        seconds = clock() - start
    finally:
        consumer.close()
    return StageResult(done, seconds)


def _read_from_start(settings: Settings, topic: str) -> KafkaConsumer:
    """A consumer outside any group on every partition of ``topic`` from offset 0, fetching as the worker does."""
    consumer = make_reader(settings.kafka, auto_offset_reset="earliest")
    try:
        assign_all(consumer, [topic])
    except BaseException:
        consumer.close()
        raise
    return consumer
