"""The bench's stages as a table, in the order they run, and the context they share for one modality.

Each stage says whether it runs for a workload and the options, how many rows its progress bar
counts, how it is measured and what the live table notes beside its rate. Later stages read what
earlier ones left in the context (``pipeline_half`` offers half the rates of ``pipeline`` and
``pipeline_live``), so the order of the table is the order they must run in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from embedstream.config import Settings
from embedstream.export import ExportTarget, local_cpu_target
from embedstream.local.bench import peer, perf_analyzer, pipeline, served, stages
from embedstream.local.bench.counts import DEFAULT_PLUMBING
from embedstream.local.bench.report import ModalityBench, StageResult, ratio
from embedstream.local.bench.stages import Clocks, Follower, ModelFactory, Progress
from embedstream.local.bench.workload import Workload, preprocessed_batches, rekey
from embedstream.local.readback import TopicReader
from embedstream.local.samples.traffic import Message
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess
from embedstream.modalities import defaults
from embedstream.service import encoder_spec

HALF_LOAD = 0.5


@dataclass
class BenchOptions:
    modalities: Sequence[str]
    counts: dict[str, int]
    out: Path
    workdir: Path
    partitions: int = 4
    # The null-encoder and raw kafka-python stages get at least this many: a few hundred pass too fast to
    # time. 0: the modality's own (``counts.DEFAULT_PLUMBING``).
    plumbing_count: int = 3000
    # Above 1, a further stage: this many workers in one consumer group at saturation.
    workers: int = 1
    # Only these stages (by name) and the ones they read, in table order; None: every stage.
    stages: frozenset[str] | None = None


@dataclass
class BenchContext:
    """One modality's run: its real pipeline and null twin, a worker and an output follower for each."""

    stack: LocalStack
    w: Workload
    opts: BenchOptions
    clocks: Clocks
    # Starts the live table's row of (modality, stage) and returns what advances it.
    advance: Callable[[str, str], Progress]
    real: Settings
    null: Settings
    target: ExportTarget  # how LocalStack exported the served models
    bench: ModalityBench
    workers: tuple[WorkerProcess, WorkerProcess]
    followers: tuple[Follower, Follower]
    batches: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def progress(self, stage: str) -> Progress:
        return self.advance(self.w.modality, stage)

    @property
    def model_dir(self) -> Path:
        """The served model's directory in the stack's model repository."""
        return self.stack.model_repository / self.bench.model

    @cached_property
    def plumbing(self) -> list[Message]:
        """The null-encoder stage's messages, which the raw kafka-python stages reuse."""
        return rekey(pipeline.at_least(self.w.messages, _plumbing_count(self.w, self.opts)), "null")

    def close(self) -> None:
        for f in self.followers:
            f.close()
        for wp in self.workers:
            wp.terminate()


def open_context(
    stack: LocalStack, w: Workload, opts: BenchOptions, clocks: Clocks, advance: Callable[[str, str], Progress]
) -> BenchContext:
    """The context, its workers created (not started) and its followers reading; ``close`` ends both."""
    real, null = stack.local_settings(w.settings), stack.local_settings(w.null_settings)
    target = local_cpu_target()
    bench = ModalityBench(
        modality=w.modality,
        model=encoder_spec(real).name,
        null_model=encoder_spec(null).name,
        max_batch=real.batch.max_size,
        max_wait_ms=real.batch.max_wait_ms,
        max_in_flight=real.batch.max_in_flight,
        torch_threads=target.torch_threads,
        instances=target.instances,
        cpus=os.cpu_count() or 1,
        best_peer_target=defaults(w.modality).bench_peer_target,
    )
    bench.served_runtime = served.served_runtime(stack.model_repository / bench.model)
    m = w.modality
    workers = (WorkerProcess(real, stack.workdir, f"bench-{m}"), WorkerProcess(null, stack.workdir, f"bench-null-{m}"))
    followers = (Follower(TopicReader(real.kafka), workers[0]), Follower(TopicReader(null.kafka), workers[1]))
    return BenchContext(stack, w, opts, clocks, advance, real, null, target, bench, workers, followers)


def prepare(ctx: BenchContext) -> None:
    """The model inputs the in-process and Triton stages send, decoded once."""
    ctx.batches = preprocessed_batches(ctx.real, ctx.w.messages)


def _always(_w: Workload, _opts: BenchOptions) -> bool:
    return True


def _messages(w: Workload, _opts: BenchOptions) -> int:
    return len(w.messages)


def _plumbing_count(w: Workload, opts: BenchOptions) -> int:
    return opts.plumbing_count or DEFAULT_PLUMBING[w.modality]


def _plumbing_total(w: Workload, opts: BenchOptions) -> int:
    return max(_plumbing_count(w, opts), len(w.messages))


def _no_note(_ctx: BenchContext, _res: StageResult) -> str:
    return ""


def _nothing(_ctx: BenchContext) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    """One row of the bench (``name`` is its key in ``report.STAGES`` and in bench.json)."""

    name: str
    run: Callable[[BenchContext], StageResult]
    note: Callable[[BenchContext, StageResult], str] = _no_note
    applies: Callable[[Workload, BenchOptions], bool] = _always
    total: Callable[[Workload, BenchOptions], int] = _messages
    # Work that follows the stage once its row is done, and is not part of its time.
    after: Callable[[BenchContext], None] = _nothing
    # The stage decides how many rows it sends: its bar's total is what it did, not ``total``.
    measured_total: bool = False


def _bare_shapes(ctx: BenchContext) -> list[tuple[int, int]]:
    # One instance on every core, and the local Triton's shape: the better one is what the model allows.
    return list(dict.fromkeys([(1, ctx.bench.cpus), (ctx.target.instances, ctx.target.torch_threads)]))


def _bare_with(ctx: BenchContext, stage: str, model: ModelFactory | None) -> StageResult:
    return stages.best_bare_model(ctx.real, ctx.batches, _bare_shapes(ctx), ctx.clocks.mono, ctx.progress(stage), model)


def _bare(ctx: BenchContext) -> StageResult:
    return _bare_with(ctx, "bare", None)


def _bare_torchscript(ctx: BenchContext) -> StageResult:
    """The ``model.pt`` Triton's Python backend loads (or one traced for the bench when the stack serves
    ONNX), run in this process on the same batches."""
    path = served.torchscript_file(ctx.real, ctx.model_dir, ctx.stack.workdir)
    res = _bare_with(ctx, "bare_torchscript", served.torchscript_model(path, encoder_spec(ctx.real)))
    res.extra["served_file"] = path.parent.parent == ctx.model_dir
    return res


def _bare_onnx(ctx: BenchContext) -> StageResult:
    """ONNX Runtime on the same batches: the served file, or one exported and checked for the bench."""
    path = served.onnx_file(ctx.real, ctx.model_dir, ctx.batches[0], ctx.stack.workdir)
    res = _bare_with(ctx, "bare_onnx", served.onnx_model(path, encoder_spec(ctx.real)))
    res.extra["served_file"] = path.parent.parent == ctx.model_dir
    return res


def _bare_note(ctx: BenchContext, res: StageResult) -> str:
    return f"batch {ctx.bench.max_batch}, {res.extra['instances']}x{res.extra['threads']} thr"


def _onnx_applies(_w: Workload, _opts: BenchOptions) -> bool:
    return served.onnx_available()


def _decode(ctx: BenchContext) -> StageResult:
    # The plumbing count, not the model's: decode is several times faster than the model, and the
    # model's count of images passed in under 2 s, too short a time for a steady figure.
    return stages.decode_only(ctx.real, ctx.plumbing, ctx.clocks.mono)


def _triton(ctx: BenchContext) -> StageResult:
    return stages.triton_alone(ctx.real, ctx.batches, ctx.clocks.mono, ctx.progress("triton"))


def _perf_analyzer(ctx: BenchContext) -> StageResult:
    """Same model, batch, requests in flight and input bytes, from Triton's own C++ client."""
    assert ctx.stack.triton is not None  # started by LocalStack.start
    ctx.progress("perf_analyzer")  # starts its clock; it reports once, at the end
    return perf_analyzer.measure(ctx.real, ctx.batches, ctx.stack.triton.grpc_url, ctx.stack.workdir)


def _saturation(ctx: BenchContext) -> StageResult:
    worker, follower = ctx.workers[0], ctx.followers[0]
    messages = rekey(ctx.w.messages, "sat")
    res = pipeline.backlog(ctx.real, worker, follower, messages, b"sat-", ctx.progress("pipeline"), ctx.clocks)
    ctx.bench.embedded, ctx.bench.batches = stages.worker_counters(worker)
    return res


def _saturation_note(ctx: BenchContext, res: StageResult) -> str:
    cpu = res.extra.get("worker_cpu_us_per_message")
    return f"mean batch {ctx.bench.mean_batch:.1f}" + (f", worker {cpu:.0f} us CPU/msg" if cpu else "")


def _live(ctx: BenchContext) -> StageResult:
    """The same worker, timed while the messages are produced: on shared cores the producer takes
    CPU from it, so "50% load" is half the lower of the two rates, not of the backlog's alone."""
    live = rekey(ctx.w.messages, "live")
    progress = ctx.progress("pipeline_live")
    rows, seconds, _ = pipeline.burst(ctx.real, ctx.workers[:1], ctx.followers[0], live, b"live-", progress, ctx.clocks)
    return StageResult(rows, seconds)


def _half(ctx: BenchContext) -> StageResult:
    b = ctx.bench
    b.offered_rate = HALF_LOAD * min(b.stages["pipeline"].throughput, b.stages["pipeline_live"].throughput)
    messages = rekey(ctx.w.messages, "half")
    res, b.latencies_ms = pipeline.paced(
        ctx.real, ctx.followers[0], messages, b.offered_rate, ctx.progress("pipeline_half"), ctx.clocks
    )
    embedded, batches = stages.worker_counters(ctx.workers[0])
    b.half_batch = ratio(embedded - b.embedded, batches - b.batches)
    return res


def _half_batch_model_time(ctx: BenchContext) -> None:
    b = ctx.bench
    if b.half_batch:
        size = max(1, round(b.half_batch))
        b.half_batch_model_ms = stages.model_latency(
            ctx.real, ctx.w.messages, size, ctx.target.torch_threads, ctx.clocks.mono
        )


def _points(ctx: BenchContext) -> StageResult:
    return pipeline.points(ctx.real, ctx.followers[0], ctx.w, ctx.progress("pipeline_points"), ctx.clocks)


def _scaled(ctx: BenchContext) -> StageResult:
    n = ctx.opts.workers
    messages = pipeline.at_least(ctx.w.messages, len(ctx.w.messages) * n)
    return pipeline.scaled_out(
        ctx.stack,
        ctx.real,
        ctx.followers[0],
        n,
        messages,
        ctx.w.modality,
        lambda: ctx.progress("pipeline_scaled"),
        ctx.clocks,
    )


def _group(ctx: BenchContext) -> StageResult:
    return pipeline.group_backlog(
        ctx.stack,
        ctx.real,
        ctx.followers[0],
        ctx.opts.workers,
        ctx.w.messages,
        ctx.w.modality,
        ctx.progress("pipeline_group"),
        ctx.clocks,
    )


def _null(ctx: BenchContext) -> StageResult:
    ctx.workers[0].terminate()  # its idle polling is not part of this stage or those after it
    worker, follower = ctx.workers[1], ctx.followers[1]
    return pipeline.backlog(ctx.null, worker, follower, ctx.plumbing, b"null-", ctx.progress("null"), ctx.clocks)


def _raw_kafka(ctx: BenchContext) -> StageResult:
    return stages.raw_kafka(ctx.real, ctx.w.raw_topics, ctx.plumbing, ctx.clocks.mono, ctx.progress("raw_kafka"))


def _peer(ctx: BenchContext) -> StageResult:
    """The hand-written single process on the workload's messages, put on its own topic first (not timed)."""
    settings = peer.peer_settings(ctx.real, ctx.w.peer_topics)
    messages = rekey(ctx.w.messages, "peer")
    stages.produce_burst(settings.kafka, settings.kafka.input_topic, messages, ctx.clocks.wall)
    return peer.run_peer(settings, len(messages), ctx.clocks.mono, ctx.progress("peer"))


def _peer_onnx(ctx: BenchContext) -> StageResult:
    """The strongest peer on the workload's messages (the served ONNX file; one exported for the bench
    when the stack serves TorchScript), on its own topics, put there first (not timed)."""
    settings = peer.peer_settings(ctx.real, ctx.w.peer_topics)
    model_file = served.onnx_file(ctx.real, ctx.model_dir, ctx.batches[0], ctx.stack.workdir)
    messages = rekey(ctx.w.messages, "peer-onnx")
    stages.produce_burst(settings.kafka, settings.kafka.input_topic, messages, ctx.clocks.wall)
    embed = peer.onnx_embedder(settings, model_file)
    res = peer.consume_embed_produce(settings, len(messages), embed, ctx.clocks.mono, ctx.progress("peer_onnx"))
    res.extra["served_file"] = model_file.parent.parent == ctx.model_dir
    return res


def _by_reference(ctx: BenchContext) -> StageResult:
    """The workload's images as s3:// references in a local S3 server, against the same inline (reference_stage)."""
    from embedstream.local.bench.reference_stage import by_reference

    ctx.progress("by_reference")  # starts its clock; it reports once, at the end
    inline, by_ref = by_reference(ctx.stack, ctx.real, rekey(ctx.w.messages, "ref"), ctx.stack.workdir)
    extra = {"inline_per_s": inline.per_s, "vs_inline": by_ref.per_s / inline.per_s if inline.per_s else 0.0}
    return StageResult(by_ref.rows, by_ref.seconds, extra)


def _images(w: Workload, _opts: BenchOptions) -> bool:
    return w.modality == "image"


def _sink_lancedb(ctx: BenchContext) -> StageResult:
    from embedstream.local.bench.sink_stage import sink_lancedb

    topic, rows = f"{ctx.w.raw_topics[0]}-sink", _plumbing_total(ctx.w, ctx.opts)
    dim, per_message = encoder_spec(ctx.real).embedding_dim, ctx.real.batch.max_size
    args = (ctx.real, topic, rows, dim, per_message, ctx.stack.workdir, ctx.opts.partitions, ctx.clocks.mono)
    return sink_lancedb(*args, ctx.progress("sink_lancedb"))


def _raw_consume(ctx: BenchContext) -> StageResult:
    topic, count = ctx.w.raw_topics[0], len(ctx.plumbing)
    return stages.raw_consume(ctx.real, topic, count, ctx.clocks.mono, ctx.progress("raw_consume"))


# What a stage reads from earlier ones: selecting it selects them.
NEEDS: dict[str, tuple[str, ...]] = {"pipeline_half": ("pipeline", "pipeline_live")}


def runs(stage: Stage, w: Workload, opts: BenchOptions) -> bool:
    """Whether ``stage`` runs for this workload: it applies, and it (or a stage reading it) was selected."""
    if not stage.applies(w, opts):
        return False
    if opts.stages is None:
        return True
    return stage.name in opts.stages or any(stage.name in NEEDS.get(s, ()) for s in opts.stages)


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("bare", _bare, note=_bare_note),
    Stage("bare_torchscript", _bare_torchscript, note=_bare_note),
    Stage("bare_onnx", _bare_onnx, note=_bare_note, applies=_onnx_applies),
    Stage("decode", _decode, note=lambda c, r: "1 thread", total=_plumbing_total),
    Stage("triton", _triton, note=lambda c, r: f"{c.bench.max_in_flight} in flight"),
    Stage(
        "perf_analyzer",
        _perf_analyzer,
        note=lambda c, r: f"p99 {r.extra['p99_latency_ms']:.0f} ms/request",
        measured_total=True,
    ),
    Stage("pipeline", _saturation, note=_saturation_note),
    Stage("pipeline_live", _live),
    Stage(
        "pipeline_half",
        _half,
        note=lambda c, r: f"offered {c.bench.offered_rate:.0f}/s",
        after=_half_batch_model_time,
    ),
    Stage(
        "pipeline_points",
        _points,
        note=lambda c, r: f"{c.w.point_windows} windows",
        applies=lambda w, o: bool(w.points),
        total=lambda w, o: len(w.points),
    ),
    Stage(
        "pipeline_scaled",
        _scaled,
        note=lambda c, r: f"{c.opts.workers} workers",
        applies=lambda w, o: o.workers > 1,
        total=lambda w, o: len(w.messages) * o.workers,
    ),
    Stage(
        "pipeline_group",
        _group,
        note=lambda c, r: f"{c.opts.workers} workers, {r.extra['embedded_by']}",
        applies=lambda w, o: o.workers > 1,
        total=lambda w, o: len(w.messages),
    ),
    Stage("null", _null, total=_plumbing_total, after=lambda c: c.workers[1].terminate()),
    Stage(
        "raw_kafka",
        _raw_kafka,
        note=lambda c, r: f"{r.extra['mean_message_bytes'] / 1024:.1f} KiB/msg",
        total=_plumbing_total,
    ),
    Stage("raw_consume", _raw_consume, total=_plumbing_total),
    Stage(
        "sink_lancedb",
        _sink_lancedb,
        note=lambda c, r: f"{r.extra['vs_raw_consume']:.2f}x raw consume of its topic",
        total=_plumbing_total,
    ),
    Stage(
        "by_reference",
        _by_reference,
        note=lambda c, r: f"{r.extra['vs_inline']:.2f}x inline",
        applies=_images,
        measured_total=True,
    ),
    Stage("peer", _peer, note=lambda c, r: f"mean batch {r.extra['mean_batch']:.1f}"),
    Stage("peer_onnx", _peer_onnx, note=lambda c, r: f"mean batch {r.extra['mean_batch']:.1f}", applies=_onnx_applies),
)
