"""The main job on the embedded default: local stack + worker, sample images in, embeddings out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import KafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from embedstream.config import Settings
from embedstream.readback import Readback, TopicReader
from embedstream.runtime.stack import LocalStack
from embedstream.runtime.worker_process import WorkerProcess
from embedstream.samples import Sample, samples


@dataclass(frozen=True)
class DemoSummary:
    produced: int
    embedded: int
    dead_lettered: int
    seconds: float
    latency_p50_ms: float
    latency_p99_ms: float

    @property
    def throughput(self) -> float:
        return (self.embedded + self.dead_lettered) / self.seconds if self.seconds > 0 else 0.0


def produce(bootstrap: str, topic: str, batch: Sequence[Sample]) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=16 << 20)
    for s in batch:
        producer.send(topic, value=s.value, key=s.key)
    producer.flush()
    producer.close()
    return len(batch)


def summarize(produced: int, readback: Readback, seconds: float) -> DemoSummary:
    # Latency: input event time (producer timestamp) to the output message's broker timestamp.
    lat = [
        ts - ev for ts, table in readback.output_times for ev in table.column("event_time").cast("int64").to_pylist()
    ]
    p50, p99 = (float(np.percentile(lat, q)) for q in (50, 99)) if lat else (0.0, 0.0)
    return DemoSummary(produced, readback.rows, len(readback.dead_letters), seconds, p50, p99)


def run_demo(
    settings: Settings, count: int, bad_every: int, partitions: int, workdir: Path | None, console: Console
) -> DemoSummary:
    with console.status("starting local Kafka broker, exporting the encoder, starting Triton..."):
        stack = LocalStack(settings, workdir=workdir, partitions=partitions).start()
    try:
        s = stack.settings
        assert stack.triton is not None
        console.print(f"[green]broker[/] {stack.broker.bootstrap}   [green]triton[/] grpc {stack.triton.grpc_url}")
        console.print(f"[green]model[/] {stack.specs[0].name} -> {stack.model_repository}")
        worker = WorkerProcess(s, stack.workdir).start()
        with console.status("starting the image worker and joining its consumer group..."):
            worker.wait_ready()
        stack_reader: TopicReader | None = None
        try:
            reader = TopicReader(s.kafka.bootstrap_servers, s.kafka.output_topic, s.kafka.dead_letter_topic)
            stack_reader = reader
            with console.status(f"rendering {count} sample images (JPEG, PNG, WebP; 96x64 to 1024x768)..."):
                batch = list(samples(count, bad_every=bad_every, prefix="demo"))
            started = time.monotonic()
            produced = produce(s.kafka.bootstrap_servers, s.kafka.input_topic, batch)
            console.print(f"produced {produced} sample images to [bold]{s.kafka.input_topic}[/]")
            seen = 0
            with Progress(
                TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
            ) as bar:
                task = bar.add_task("rows", total=produced)
                deadline = time.monotonic() + 600
                while seen < produced and time.monotonic() < deadline:
                    if not worker.alive():
                        raise SystemExit(f"worker exited; last log lines:\n{worker.tail()}")
                    seen += reader.poll(0.5)
                    bar.update(task, completed=seen)
            summary = summarize(produced, reader.result, time.monotonic() - started)
        finally:
            if stack_reader is not None:
                stack_reader.close()
            worker.terminate()
    finally:
        with console.status("stopping Triton and the broker..."):
            stack.stop()
    return summary


def print_summary(summary: DemoSummary, console: Console) -> None:
    table = Table(title="embedstream demo", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("messages in", str(summary.produced))
    table.add_row("embeddings out", str(summary.embedded))
    table.add_row("dead-lettered", str(summary.dead_lettered))
    table.add_row("unaccounted for", str(summary.produced - summary.embedded - summary.dead_lettered))
    table.add_row("throughput", f"{summary.throughput:.1f} msg/s")
    table.add_row("latency p50 / p99", f"{summary.latency_p50_ms:.0f} / {summary.latency_p99_ms:.0f} ms")
    console.print(table)
