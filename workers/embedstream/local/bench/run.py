"""One benchmark run: the embedded stack, then every stage per modality, then JSON and plots."""

from __future__ import annotations

import datetime as dt
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from embedstream.config import Settings
from embedstream.export import local_cpu_target
from embedstream.kafka_io import ensure_topics
from embedstream.local.bench import perf_analyzer, stages
from embedstream.local.bench.plots import latency_plot, throughput_plot
from embedstream.local.bench.report import STAGES, ModalityBench, StageResult, ratio, report_json
from embedstream.local.bench.workload import POINT_SERIES, Workload, build_workload, preprocessed_batches, rekey
from embedstream.local.readback import TopicReader
from embedstream.local.stack import LocalStack
from embedstream.local.worker_process import WorkerProcess
from embedstream.service import encoder_spec

HALF_LOAD = 0.5
PLUMBING_STAGES = ("null", "raw_kafka", "raw_consume")
WAIT_TIMEOUT_S = 600.0


@dataclass
class BenchOptions:
    modalities: Sequence[str]
    counts: dict[str, int]
    out: Path
    workdir: Path
    partitions: int = 4
    # The null-encoder and raw kafka-python stages get at least this many: a few hundred pass too fast to time.
    plumbing_count: int = 3000
    # Above 1, a further stage: this many workers in one consumer group at saturation.
    workers: int = 1


@dataclass
class Clocks:
    """Injected time: ``wall`` is compared with Kafka timestamps, ``mono`` times the in-process stages."""

    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep


@dataclass
class BenchRun:
    results: list[ModalityBench]
    meta: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.fields[modality]:>10}"),
        TextColumn("{task.description:<13}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[result]}"),
        console=console,
    )


class _Board:
    """The live table: one progress row per modality and stage, its result filled in when it ends."""

    def __init__(self, bar: Progress, workloads: Sequence[Workload], plumbing_count: int, workers: int = 1) -> None:
        self.bar = bar
        self.tasks: dict[tuple[str, str], TaskID] = {}
        for w in workloads:
            # Stage keys, not the long labels: the live table has to fit an 80-column terminal.
            for key in STAGES:
                if (key == "pipeline_scaled" and workers < 2) or (key == "pipeline_points" and not w.points):
                    continue
                total = max(plumbing_count, len(w.messages)) if key in PLUMBING_STAGES else len(w.messages)
                if key == "pipeline_points":
                    total = len(w.points)
                if key == "pipeline_scaled":
                    total *= workers
                self.tasks[(w.modality, key)] = bar.add_task(
                    key, total=total, modality=w.modality, result="", start=False
                )

    def advance(self, modality: str, stage: str) -> Callable[[int], None]:
        task = self.tasks[(modality, stage)]
        self.bar.start_task(task)
        return lambda n: self.bar.advance(task, n)

    def done(self, modality: str, stage: str, result: StageResult, note: str = "") -> None:
        task = self.tasks[(modality, stage)]
        # perf_analyzer decides how many rows it sends: the bar's total is what it did.
        total = result.messages if stage == "perf_analyzer" else None
        self.bar.update(task, total=total, completed=result.messages, result=f"{result.throughput:7.1f}/s {note}")
        self.bar.stop_task(task)


def run_bench(base: Settings, opts: BenchOptions, console: Console, clocks: Clocks | None = None) -> BenchRun:
    clocks = clocks or Clocks()
    began = clocks.wall()
    meta: dict[str, Any] = {
        "started_at": dt.datetime.fromtimestamp(began, dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": list(os.getloadavg()),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "counts": {m: opts.counts[m] for m in opts.modalities},
        "partitions": opts.partitions,
        "workers": opts.workers,
    }
    workdir = opts.workdir
    with console.status("rendering traffic and training the time-series autoencoder on normal data..."):
        workloads = [build_workload(base, m, opts.counts[m], workdir) for m in opts.modalities]
    pipelines = [w.settings for w in workloads] + [w.null_settings for w in workloads]
    with console.status("starting the local broker, exporting the encoders and their null twins, starting Triton..."):
        stack = LocalStack(pipelines, workdir=workdir, partitions=opts.partitions).start()
    results: list[ModalityBench] = []
    try:
        for w in workloads:
            ensure_topics(stack.settings.kafka, dict.fromkeys(w.raw_topics, opts.partitions))
        with _progress(console) as bar:
            board = _Board(bar, workloads, opts.plumbing_count, opts.workers)
            for w in workloads:
                results.append(_bench_modality(stack, w, board, clocks, opts.plumbing_count, opts.workers))
    finally:
        with console.status("stopping Triton and the broker..."):
            stack.stop()
    meta["seconds"] = clocks.wall() - began
    run = BenchRun(results, meta)
    run.files = write_outputs(run, opts.out)
    return run


def write_outputs(run: BenchRun, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    path.write_bytes(orjson.dumps(report_json(run.results, run.meta), option=orjson.OPT_INDENT_2))
    return {
        "json": path,
        "throughput_png": throughput_plot(run.results, out / "throughput.png"),
        "latency_png": latency_plot(run.results, out / "latency.png"),
    }


def _bench_modality(
    stack: LocalStack, w: Workload, board: _Board, clocks: Clocks, plumbing_count: int, scale_out: int = 1
) -> ModalityBench:
    real, null = stack.local_settings(w.settings), stack.local_settings(w.null_settings)
    target = local_cpu_target()  # how LocalStack exported the served models
    b = ModalityBench(
        modality=w.modality,
        model=encoder_spec(real).name,
        null_model=encoder_spec(null).name,
        max_batch=real.batch.max_size,
        max_wait_ms=real.batch.max_wait_ms,
        max_in_flight=real.batch.max_in_flight,
        torch_threads=target.torch_threads,
        instances=target.instances,
        cpus=os.cpu_count() or 1,
    )
    m = w.modality
    workers = [WorkerProcess(real, stack.workdir, f"bench-{m}"), WorkerProcess(null, stack.workdir, f"bench-null-{m}")]
    followers = [stages.Follower(TopicReader(k), wp) for k, wp in zip((real.kafka, null.kafka), workers, strict=True)]
    try:
        batches = preprocessed_batches(real, w.messages)

        # One instance on every core, and the local Triton's shape: the better one is what the model allows.
        shapes = list(dict.fromkeys([(1, b.cpus), (target.instances, target.torch_threads)]))
        res = stages.best_bare_model(real, batches, shapes, clocks.mono, board.advance(m, "bare"))
        board.done(m, "bare", res, f"batch {b.max_batch}, {res.extra['instances']}x{res.extra['threads']} thr")
        b.stages["bare"] = res

        res = stages.decode_only(real, w.messages, clocks.mono)
        board.done(m, "decode", res, "1 thread")
        b.stages["decode"] = res

        res = stages.triton_alone(real, batches, clocks.mono, board.advance(m, "triton"))
        board.done(m, "triton", res, f"{b.max_in_flight} in flight")
        b.stages["triton"] = res

        # Same model, batch, requests in flight and input bytes, from Triton's own C++ client.
        assert stack.triton is not None  # started by LocalStack.start
        board.advance(m, "perf_analyzer")  # starts its clock; it reports once, at the end
        res = perf_analyzer.measure(real, batches, stack.triton.grpc_url, stack.workdir)
        board.done(m, "perf_analyzer", res, f"p99 {res.extra['p99_latency_ms']:.0f} ms/request")
        b.stages["perf_analyzer"] = res

        messages = rekey(w.messages, "sat")
        res = _backlog(real, workers[0], followers[0], messages, b"sat-", board.advance(m, "pipeline"), clocks)
        embedded, batches_done = stages.worker_counters(workers[0])
        b.embedded, b.batches = embedded, batches_done
        board.done(m, "pipeline", res, f"mean batch {b.mean_batch:.1f}")
        b.stages["pipeline"] = res

        # The same worker, timed while the messages are produced: on shared cores the producer takes
        # CPU from it, so "50% load" is half the lower of the two rates, not of the backlog's alone.
        live = rekey(w.messages, "live")
        progress = board.advance(m, "pipeline_live")
        rows, seconds, _ = _burst(real, workers[:1], followers[0], live, b"live-", progress, clocks)
        b.stages["pipeline_live"] = live_res = StageResult(rows, seconds)
        board.done(m, "pipeline_live", live_res)

        b.offered_rate = HALF_LOAD * min(res.throughput, live_res.throughput)
        res, b.latencies_ms = _paced(
            real, followers[0], rekey(w.messages, "half"), b.offered_rate, board.advance(m, "pipeline_half"), clocks
        )
        after = stages.worker_counters(workers[0])
        b.half_batch = ratio(after[0] - embedded, after[1] - batches_done)
        board.done(m, "pipeline_half", res, f"offered {b.offered_rate:.0f}/s")
        b.stages["pipeline_half"] = res
        if b.half_batch:
            size = max(1, round(b.half_batch))
            b.half_batch_model_ms = stages.model_latency(real, w.messages, size, target.torch_threads, clocks.mono)
        if w.points:
            res = _points(real, followers[0], w, board.advance(m, "pipeline_points"), clocks)
            board.done(m, "pipeline_points", res, f"{w.point_windows} windows")
            b.stages["pipeline_points"] = res
        if scale_out > 1:
            messages = _at_least(w.messages, len(w.messages) * scale_out)
            res = _scaled_out(stack, real, workers[0], followers[0], scale_out, messages, board, m, clocks)
            board.done(m, "pipeline_scaled", res, f"{scale_out} workers")
            b.stages["pipeline_scaled"] = res
        workers[0].terminate()  # its idle polling is not part of the stages below

        plumbing = rekey(_at_least(w.messages, plumbing_count), "null")
        res = _backlog(null, workers[1], followers[1], plumbing, b"null-", board.advance(m, "null"), clocks)
        board.done(m, "null", res)
        b.stages["null"] = res
        workers[1].terminate()

        res = stages.raw_kafka(real, w.raw_topics, plumbing, clocks.mono, board.advance(m, "raw_kafka"))
        board.done(m, "raw_kafka", res, f"{res.extra['mean_message_bytes'] / 1024:.1f} KiB/msg")
        b.stages["raw_kafka"] = res
        res = stages.raw_consume(real, w.raw_topics[0], len(plumbing), clocks.mono, board.advance(m, "raw_consume"))
        board.done(m, "raw_consume", res)
        b.stages["raw_consume"] = res
    finally:
        for f in followers:
            f.close()
        for wp in workers:
            wp.terminate()
    return b


def _at_least(messages: list[tuple[bytes, bytes]], count: int) -> list[tuple[bytes, bytes]]:
    """The messages repeated up to ``count`` (never fewer than given)."""
    return (messages * -(-count // len(messages)))[: max(count, len(messages))]


def _backlog(
    settings: Settings,
    worker: WorkerProcess,
    follower: stages.Follower,
    messages: list[tuple[bytes, bytes]],
    prefix: bytes,
    progress: Callable[[int], None],
    clocks: Clocks,
) -> StageResult:
    """Catching up on a backlog: N messages already on the topic, then the worker starts.

    Throughput = N / (last output's timestamp - the moment the worker's group assigned it the
    partitions). Producing is not timed and does not compete with the worker for the CPU.
    """
    k = settings.kafka
    stages.produce_burst(k, k.input_topic, messages, clocks.wall)
    worker.start()
    assigned_at = stages.wait_assigned(worker, clocks.wall, clocks.sleep)
    # The outputs are read once the worker is done, so reading them takes no CPU from it meanwhile.
    stages.wait_embedded([worker], len(messages), WAIT_TIMEOUT_S, progress, clocks.sleep)
    rows = follower.wait_for(prefix, len(messages), WAIT_TIMEOUT_S, stages.no_progress)
    return StageResult(len(rows), max(rows.values()) / 1000 - assigned_at)


def _scaled_out(
    stack: LocalStack,
    settings: Settings,
    first: WorkerProcess,
    follower: stages.Follower,
    count: int,
    messages: list[tuple[bytes, bytes]],
    board: _Board,
    modality: str,
    clocks: Clocks,
) -> StageResult:
    """``count`` workers in ``first``'s consumer group, as a deployment scales out, at saturation.

    The messages go into the running, settled group (every partition owned once) rather than
    waiting as a backlog, which members joining one by one would split across rebalances; so the
    burst shares the CPU with the workers. ``first`` alone was timed the same way (``pipeline_live``),
    so ``scale_out`` compares like with like. Throughput = N / (last output's timestamp - the moment
    producing started).
    """
    extra = [WorkerProcess(settings, stack.workdir, f"bench-{modality}-{i}") for i in range(1, count)]
    group = [first, *extra]
    try:
        for wp in extra:
            wp.start()
        stages.wait_group_settled(group, stack.partitions, clocks.wall, clocks.sleep)
        progress = board.advance(modality, "pipeline_scaled")
        scaled = rekey(messages, "scale")
        rows, seconds, by_worker = _burst(settings, group, follower, scaled, b"scale-", progress, clocks)
    finally:
        for wp in extra:
            wp.terminate()
    return StageResult(rows, seconds, {"workers": count, "embedded_by": by_worker})


def _burst(
    settings: Settings,
    group: Sequence[WorkerProcess],
    follower: stages.Follower,
    messages: list[tuple[bytes, bytes]],
    prefix: bytes,
    progress: Callable[[int], None],
    clocks: Clocks,
    rows_expected: int | None = None,
    by_id: bool = False,
) -> tuple[int, float, list[int]]:
    """Produce ``messages`` to a running group; (rows, seconds to the last output, rows per member).

    ``rows_expected`` defaults to one row a message; ``by_id`` tells rows apart by id, not key.
    """
    k = settings.kafka
    expected = len(messages) if rows_expected is None else rows_expected
    before = [stages.worker_counters(wp)[0] for wp in group]
    started = stages.produce_burst(k, k.input_topic, messages, clocks.wall)
    stages.wait_embedded(group, sum(before) + expected, WAIT_TIMEOUT_S, progress, clocks.sleep, sum(before))
    rows = follower.wait_for(prefix, expected, WAIT_TIMEOUT_S, stages.no_progress, by_id=by_id)
    by_worker = [stages.worker_counters(wp)[0] - b for wp, b in zip(group, before, strict=True)]
    return len(rows), max(rows.values()) / 1000 - started, by_worker


def _points(
    settings: Settings, follower: stages.Follower, w: Workload, progress: Callable[[int], None], clocks: Clocks
) -> StageResult:
    """Observations, one point a message, produced into the running worker, which windows them.

    Throughput in points (messages) = N / (last window's output timestamp - the moment producing
    started). A series' windows share its key, so they are told apart by row id.
    """
    per_window = len(w.points) // w.point_windows

    def points_done(windows: int) -> None:
        progress(windows * per_window)

    group = [follower.worker]
    rows, seconds, _ = _burst(
        settings, group, follower, w.points, b"points-", points_done, clocks, rows_expected=w.point_windows, by_id=True
    )
    return StageResult(len(w.points), seconds, {"windows": rows, "series": POINT_SERIES})


def _paced(
    settings: Settings,
    follower: stages.Follower,
    messages: list[tuple[bytes, bytes]],
    rate: float,
    progress: Callable[[int], None],
    clocks: Clocks,
) -> tuple[StageResult, list[float]]:
    """Messages at ``rate``; latency per message = its output's timestamp - its own send timestamp."""
    k = settings.kafka
    sent: dict[bytes, int] = {}
    stop = threading.Event()

    def produce() -> None:
        sent.update(stages.produce_paced(k, k.input_topic, messages, rate, clocks.wall, clocks.sleep, stop))

    # The producer keeps its schedule on its own thread while this one waits for the worker.
    thread = threading.Thread(target=produce, name="bench-paced-producer", daemon=True)
    before = stages.worker_counters(follower.worker)[0]
    thread.start()
    try:
        stages.wait_embedded([follower.worker], before + len(messages), WAIT_TIMEOUT_S, progress, clocks.sleep, before)
        rows = follower.wait_for(b"half-", len(messages), WAIT_TIMEOUT_S, stages.no_progress)
    finally:
        stop.set()
        thread.join()
    latencies = [float(rows[key] - ts) for key, ts in sent.items() if key in rows]
    seconds = (max(rows.values()) - min(sent.values())) / 1000 if sent else 0.0
    return StageResult(len(rows), seconds, {"offered_rate": rate}), latencies
