"""The main job on the embedded default: local stack + one worker per modality, sample data in, embeddings out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedstream.config import KafkaSettings, Settings
from embedstream.kafka_io import make_writer
from embedstream.local.pipelines import MODALITIES
from embedstream.local.quality import Retrieval, keyed_retrieval
from embedstream.local.readback import Readback, TopicReader
from embedstream.local.samples.traffic import (
    DemoTraffic,
    fit_image_detector,
    image_traffic,
    text_traffic,
    timeseries_traffic,
)
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess

if TYPE_CHECKING:
    # rich comes with the optional ``tools`` extra: imported where the demo draws.
    from rich.console import Console

# Room for the largest sample images in one request, whatever the settings' producer limit.
MAX_REQUEST_BYTES = 16 << 20


@dataclass(frozen=True)
class DemoSummary:
    modality: str
    model: str
    produced: int
    embedded: int
    dead_lettered: int
    seconds: float
    latency_p50_ms: float
    latency_p99_ms: float
    anomaly_precision: float | None = None
    anomaly_recall: float | None = None
    # images: ROC-AUC of the served anomaly_score, the unusual images against the photos
    anomaly_auc: float | None = None
    # nearest neighbours among the embeddings read back (images: copies of one photo; text: paraphrases)
    retrieval: Retrieval | None = None
    # bad-on-purpose keys that came back as an embedding instead of a dead letter, or not at all
    bad_not_dead_lettered: int = 0
    # rows read back that each store holds after the sink step (image and text): store -> rows
    stored: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return (self.embedded + self.dead_lettered) / self.seconds if self.seconds > 0 else 0.0

    @property
    def unaccounted(self) -> int:
        return self.produced - self.embedded - self.dead_lettered


def produce(k: KafkaSettings, topic: str, batch: Sequence[tuple[bytes, bytes]]) -> dict[bytes, float]:
    """Send the batch; returns when each key was sent (ms since the epoch), for latency."""
    producer = make_writer(k, linger_ms=5, max_request_size=MAX_REQUEST_BYTES)
    sent: dict[bytes, float] = {}
    for key, value in batch:
        sent[key] = time.time() * 1000
        producer.send(topic, value=value, key=key)
    producer.flush()
    producer.close()
    return sent


def summarize(
    traffic: DemoTraffic, model: str, readback: Readback, seconds: float, sent: dict[bytes, float]
) -> DemoSummary:
    # Latency: from sending a message to the broker's timestamp on the output that carries its row
    # (a row's own event time is the data's time, which for replayed or windowed data is long past).
    lat = [ts - sent[k] for ts, table in readback.output_times for k in table.column("key").to_pylist() if k in sent]
    p50, p99 = (float(np.percentile(lat, q)) for q in (50, 99)) if lat else (0.0, 0.0)
    precision = recall = auc = None
    table = readback.table()
    if traffic.labels and readback.rows and "anomaly" in table.column_names:
        from embedstream.training.synthetic import precision_recall

        keys, flags = table.column("key").to_pylist(), table.column("anomaly").to_pylist()
        truth = np.array([traffic.labels.get(k, False) for k in keys])
        precision, recall = precision_recall(np.array(flags), truth)
        if "anomaly_score" in table.column_names and truth.any() and not truth.all():
            from embedstream.training.detector import roc_auc

            scores = np.array(table.column("anomaly_score").to_pylist(), np.float64)
            auc = roc_auc(scores[~truth], scores[truth])
    retrieval = None
    if traffic.groups and readback.rows:
        from embedstream.sinks.arrow_codec import embeddings_matrix

        retrieval = keyed_retrieval(table.column("key").to_pylist(), embeddings_matrix(table), traffic.groups)
    dead = {d.key for d in readback.dead_letters}
    return DemoSummary(
        traffic.modality,
        model,
        len(traffic.messages),
        readback.rows,
        len(readback.dead_letters),
        seconds,
        p50,
        p99,
        precision,
        recall,
        auc,
        retrieval,
        sum(k not in dead for k in traffic.bad_keys),
    )


def build_traffic(
    settings: Settings, modalities: Sequence[str], count: int, bad_every: int, workdir: Path
) -> list[DemoTraffic]:
    makers = {
        "image": lambda: _with_detector(
            image_traffic(settings, count, bad_every, unusual=max(6, count // 10)), workdir
        ),
        "text": lambda: text_traffic(settings, count, bad_every),
        "timeseries": lambda: timeseries_traffic(settings, max(40, count // 3), workdir),
    }
    return [makers[m]() for m in modalities]


def _with_detector(traffic: DemoTraffic, workdir: Path) -> DemoTraffic:
    """The image pipeline serves an anomaly detector fitted on other copies of its photos."""
    traffic.settings = fit_image_detector(traffic.settings, workdir)
    return traffic


def run_demo(
    settings: Settings,
    count: int,
    bad_every: int,
    partitions: int,
    workdir: Path | None,
    console: Console,
    modalities: Sequence[str] = MODALITIES,
) -> list[DemoSummary]:
    workdir = Path(workdir or ".embedstream")
    with console.status("rendering sample data, fitting the image anomaly detector, training the time-series model..."):
        traffic = build_traffic(settings, modalities, count, bad_every, workdir)
    with console.status("starting the local Kafka broker, exporting the encoders, starting Triton..."):
        stack = LocalStack([t.settings for t in traffic], workdir=workdir, partitions=partitions).start()
    workers: list[WorkerProcess] = []
    readers: list[TopicReader] = []
    try:
        _print_stack(stack, console)
        local = stack.all_settings
        # Built before any starts: if one fails to start or get ready, the finally below still terminates all.
        workers = [WorkerProcess(s, stack.workdir, f"worker-{t.modality}") for s, t in zip(local, traffic, strict=True)]
        _start_workers(workers, console)
        readers = [TopicReader(s.kafka) for s in local]
        started = time.monotonic()
        sent = _produce_all(local, traffic, console)
        done_at = _follow(traffic, readers, workers, started, console)
        summaries = [
            summarize(t, spec_name, r.result, done_at[i], sent[i])
            for i, (t, r, spec_name) in enumerate(zip(traffic, readers, _model_names(stack, traffic), strict=True))
        ]
        return _sink_step(summaries, local, traffic, readers, stack.workdir, console)
    finally:
        _shut_down(stack, readers, workers, console)


def _sink_step(
    summaries: list[DemoSummary],
    local: Sequence[Settings],
    traffic: Sequence[DemoTraffic],
    readers: Sequence[TopicReader],
    workdir: Path,
    console: Console,
) -> list[DemoSummary]:
    """The image and text embeddings into LanceDB and Feast (``local.demo_sink``), where installed."""
    from embedstream.local.demo_sink import SinkLane, sink_demo, sinks_installed

    if not sinks_installed():
        console.print("stores skipped: LanceDB and Feast come with the sinks extra (pip install 'embedstream[sinks]')")
        return summaries
    lanes = [SinkLane(t.modality, s, r.result, t.groups) for s, t, r in zip(local, traffic, readers, strict=True)]
    counts = sink_demo(lanes, workdir, console)
    return [dataclasses.replace(s, stored=counts.get(s.modality, {})) for s in summaries]


def _print_stack(stack: LocalStack, console: Console) -> None:
    assert stack.triton is not None
    console.print(f"[green]broker[/] {stack.broker.bootstrap}   [green]triton[/] grpc {stack.triton.grpc_url}")
    console.print(f"[green]models[/] {', '.join(s.name for s in stack.specs)} in {stack.model_repository}")


def _start_workers(workers: Sequence[WorkerProcess], console: Console) -> None:
    with console.status(f"starting {len(workers)} workers and joining their consumer groups..."):
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()


def _produce_all(
    local: Sequence[Settings], traffic: Sequence[DemoTraffic], console: Console
) -> list[dict[bytes, float]]:
    sent = [produce(s.kafka, s.kafka.input_topic, t.messages) for s, t in zip(local, traffic, strict=True)]
    console.print(", ".join(f"{len(t.messages)} {t.modality} messages" for t in traffic) + " produced")
    return sent


def _shut_down(
    stack: LocalStack, readers: Sequence[TopicReader], workers: Sequence[WorkerProcess], console: Console
) -> None:
    for r in readers:
        r.close()
    for w in workers:
        w.terminate()
    with console.status("stopping Triton and the broker..."):
        stack.stop()


def _model_names(stack: LocalStack, traffic: Sequence[DemoTraffic]) -> list[str]:
    from embedstream.service import encoder_spec

    return [encoder_spec(t.settings).name for t in traffic]


def _follow(
    traffic: Sequence[DemoTraffic],
    readers: Sequence[TopicReader],
    workers: Sequence[WorkerProcess],
    started: float,
    console: Console,
) -> list[float]:
    """Live progress per modality until every message is accounted for; returns seconds per modality."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    seen = [0] * len(traffic)
    done_at = [0.0] * len(traffic)
    with Progress(
        TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        tasks = [bar.add_task(t.modality, total=len(t.messages)) for t in traffic]
        deadline = time.monotonic() + 900
        while any(s < len(t.messages) for s, t in zip(seen, traffic, strict=True)) and time.monotonic() < deadline:
            for i, (t, r, w) in enumerate(zip(traffic, readers, workers, strict=True)):
                if seen[i] >= len(t.messages):
                    continue
                if not w.alive():
                    raise SystemExit(f"the {t.modality} worker exited; last log lines:\n{w.tail()}")
                seen[i] += r.poll(0.1)
                bar.update(tasks[i], completed=seen[i])
                if seen[i] >= len(t.messages):
                    done_at[i] = time.monotonic() - started
    return [d or (time.monotonic() - started) for d in done_at]


def print_summary(summaries: Sequence[DemoSummary], console: Console) -> None:
    from rich.table import Table

    table = Table(title="embedstream demo")
    table.add_column("figure")
    for s in summaries:
        table.add_column(s.modality, justify="right")
    rows = [
        ("model", lambda s: s.model),
        ("messages in", lambda s: str(s.produced)),
        ("embeddings out", lambda s: str(s.embedded)),
        ("dead-lettered", lambda s: str(s.dead_lettered)),
        ("bad, not dead-lettered", lambda s: str(s.bad_not_dead_lettered)),
        ("unaccounted for", lambda s: str(s.unaccounted)),
        ("throughput", lambda s: f"{s.throughput:.1f} msg/s"),
        ("latency p50", lambda s: f"{s.latency_p50_ms:.0f} ms"),
        ("latency p99", lambda s: f"{s.latency_p99_ms:.0f} ms"),
    ]
    if any(s.stored for s in summaries):
        rows.append(
            ("stored in LanceDB / Feast", lambda s: f"{s.stored['lancedb']} / {s.stored['feast']}" if s.stored else "-")
        )
    if any(s.anomaly_recall is not None for s in summaries):
        rows.append(
            (
                "anomaly precision / recall",
                lambda s: "-" if s.anomaly_recall is None else f"{s.anomaly_precision:.2f} / {s.anomaly_recall:.2f}",
            )
        )
    if any(s.anomaly_auc is not None for s in summaries):
        rows.append(("anomaly ROC-AUC", lambda s: "-" if s.anomaly_auc is None else f"{s.anomaly_auc:.2f}"))
    if any(s.retrieval is not None for s in summaries):
        rows.append(("neighbour top-1 / top-5", _retrieval_cell))
        rows.append(("  chance (rows scored)", lambda s: _retrieval_cell(s, chance=True)))
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in summaries))
    console.print(table)
    if any(s.retrieval is not None for s in summaries):
        console.print(
            "neighbour: is the nearest other embedding read back (cosine; top-5: any of the five nearest) "
            "another copy of the same photo (image), or a paraphrase rather than any unrelated sentence (text)."
        )
    if any(s.anomaly_auc is not None for s in summaries):
        console.print(
            "anomaly (image): the detector served inside the image model, fitted on other copies of the same photos; "
            "the stream's unusual images (textures, drawings, flat, noise) are the positives."
        )
    console.print("All modalities share the two CPU cores here, so each one's throughput is a share of the machine.")


def _retrieval_cell(s: DemoSummary, chance: bool = False) -> str:
    r = s.retrieval
    if r is None or r.anchors == 0:
        return "-"
    if chance:
        return f"{r.chance_top1:.2f} / {r.chance_top5:.2f} ({r.anchors})"
    return f"{r.top1:.2f} / {r.top5:.2f}"
