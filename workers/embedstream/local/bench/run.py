"""One benchmark run: the embedded stack, then every stage per modality, then JSON and plots."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from embedstream.config import Settings
from embedstream.kafka_io import ensure_topics
from embedstream.local.bench.plots import latency_plot, throughput_plot
from embedstream.local.bench.report import ModalityBench, StageResult, report_json
from embedstream.local.bench.stages import Clocks
from embedstream.local.bench.table import STAGE_TABLE, BenchOptions, Stage, open_context, prepare, runs
from embedstream.local.bench.workload import Workload, build_workload
from embedstream.local.stack.stack import LocalStack

if TYPE_CHECKING:
    # rich comes with the optional ``tools`` extra: imported where the live table is drawn.
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["BenchOptions", "BenchRun", "Clocks", "run_bench", "write_outputs"]


@dataclass
class BenchRun:
    results: list[ModalityBench]
    meta: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _progress(console: Console) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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

    def __init__(self, bar: Progress, workloads: Sequence[Workload], opts: BenchOptions) -> None:
        self.bar = bar
        self.tasks: dict[tuple[str, str], TaskID] = {}
        for w in workloads:
            for stage in STAGE_TABLE:
                if runs(stage, w, opts):
                    # Stage keys, not the long labels: the live table has to fit an 80-column terminal.
                    self.tasks[(w.modality, stage.name)] = bar.add_task(
                        stage.name, total=stage.total(w, opts), modality=w.modality, result="", start=False
                    )

    def advance(self, modality: str, stage: str) -> Callable[[int], None]:
        task = self.tasks[(modality, stage)]
        self.bar.start_task(task)
        return lambda n: self.bar.advance(task, n)

    def done(self, modality: str, stage: Stage, result: StageResult, note: str = "") -> None:
        task = self.tasks[(modality, stage.name)]
        total = result.messages if stage.measured_total else None
        self.bar.update(task, total=total, completed=result.messages, result=f"{result.throughput:7.1f}/s {note}")
        self.bar.stop_task(task)


def _meta(opts: BenchOptions, began: float) -> dict[str, Any]:
    return {
        "started_at": dt.datetime.fromtimestamp(began, dt.UTC).isoformat(timespec="seconds"),
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


def run_bench(base: Settings, opts: BenchOptions, console: Console, clocks: Clocks | None = None) -> BenchRun:
    clocks = clocks or Clocks()
    began = clocks.wall()
    meta = _meta(opts, began)
    meta["kafka_client"] = base.kafka.client
    workdir = opts.workdir
    with console.status("rendering traffic and training the time-series autoencoder on normal data..."):
        workloads = [build_workload(base, m, opts.counts[m], workdir) for m in opts.modalities]
    pipelines = [w.settings for w in workloads] + [w.null_settings for w in workloads]
    with console.status("starting the local broker, exporting the encoders and their null twins, starting Triton..."):
        stack = LocalStack(pipelines, workdir=workdir, partitions=opts.partitions).start()
    for w in workloads:
        console.print(f"[green]{w.modality}[/] {_model_line(w.settings)}")
    results: list[ModalityBench] = []
    try:
        for w in workloads:
            ensure_topics(stack.settings.kafka, dict.fromkeys(w.raw_topics + w.peer_topics, opts.partitions))
        with _progress(console) as bar:
            board = _Board(bar, workloads, opts)
            for w in workloads:
                results.append(_bench_modality(stack, w, board, clocks, opts))
    finally:
        with console.status("stopping Triton and the broker..."):
            stack.stop()
    meta["seconds"] = clocks.wall() - began
    run = BenchRun(results, meta)
    run.files = write_outputs(run, opts.out)
    return run


def _model_line(settings: Settings) -> str:
    """The served model and where its weights come from, so a run says what it measured."""
    from embedstream.service import encoder_spec

    spec = encoder_spec(settings)
    return f"{spec.name}, weights {settings.encoder.weights or f'packaged ({spec.source})'}"


def write_outputs(run: BenchRun, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    path.write_bytes(orjson.dumps(report_json(run.results, run.meta), option=orjson.OPT_INDENT_2))
    return {
        "json": path,
        "throughput_png": throughput_plot(run.results, out / "throughput.png"),
        "latency_png": latency_plot(run.results, out / "latency.png"),
    }


def _bench_modality(stack: LocalStack, w: Workload, board: _Board, clocks: Clocks, opts: BenchOptions) -> ModalityBench:
    """Every stage of the table that applies to this workload, in order, into one ``ModalityBench``."""
    ctx = open_context(stack, w, opts, clocks, board.advance)
    try:
        prepare(ctx)
        for stage in STAGE_TABLE:
            if not runs(stage, w, opts):
                continue
            res = stage.run(ctx)
            board.done(w.modality, stage, res, stage.note(ctx, res))
            ctx.bench.stages[stage.name] = res
            stage.after(ctx)
    finally:
        ctx.close()
    return ctx.bench
