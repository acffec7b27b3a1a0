"""How the pipeline stages are timed: a backlog, a burst into a running group, paced messages.

Throughputs and latencies come from the output records' Kafka timestamps, so reading the outputs
(after the worker is done, where possible) is not part of what is timed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from embedstream.config import Settings
from embedstream.kafka_io import ensure_topics
from embedstream.local.bench import stages
from embedstream.local.bench.report import StageResult
from embedstream.local.bench.stages import Clocks, Follower, Progress
from embedstream.local.bench.workload import POINT_SERIES, Workload, rekey
from embedstream.local.samples.traffic import Message
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess

WAIT_TIMEOUT_S = 600.0


def at_least(messages: list[Message], count: int) -> list[Message]:
    """The messages repeated up to ``count`` (never fewer than given)."""
    return (messages * -(-count // len(messages)))[: max(count, len(messages))]


def backlog(
    settings: Settings,
    worker: WorkerProcess,
    follower: Follower,
    messages: list[Message],
    prefix: bytes,
    progress: Progress,
    clocks: Clocks,
) -> StageResult:
    """Catching up on a backlog: N messages already on the topic, then the worker starts.

    Throughput = N / (last output's timestamp - the moment the worker's group assigned it the
    partitions). Producing is not timed and does not compete with the worker for the CPU.
    """
    k = settings.kafka
    stages.produce_burst(k, k.input_topic, messages, clocks.wall)
    worker.start()
    assigned_at = stages.wait_assigned([worker], clocks.wall, clocks.sleep)
    cpu_at_start = worker.cpu_seconds()
    # The outputs are read once the worker is done, so reading them takes no CPU from it meanwhile.
    stages.wait_embedded([worker], len(messages), WAIT_TIMEOUT_S, progress, clocks.sleep)
    cpu_at_end = worker.cpu_seconds()
    rows = follower.wait_for(prefix, len(messages), WAIT_TIMEOUT_S, stages.no_progress)
    res = StageResult(len(rows), max(rows.values()) / 1000 - assigned_at)
    if cpu_at_start is not None and cpu_at_end is not None and rows:
        # What one message costs the worker, all threads: less sensitive to what else shares the
        # cores than a rate, so it is the figure to compare two builds by.
        res.extra["worker_cpu_us_per_message"] = 1e6 * (cpu_at_end - cpu_at_start) / len(rows)
    return res


def scaled_out(
    stack: LocalStack,
    settings: Settings,
    follower: Follower,
    count: int,
    messages: list[Message],
    modality: str,
    start_progress: Callable[[], Progress],
    clocks: Clocks,
) -> StageResult:
    """``count`` workers in the follower's worker's consumer group, as a deployment scales out, at saturation.

    The messages go into the running, settled group (every partition owned once) rather than
    waiting as a backlog, which members joining one by one would split across rebalances; so the
    burst shares the CPU with the workers. The first worker alone was timed the same way
    (``pipeline_live``), so ``scale_out`` compares like with like. Throughput = N / (last output's
    timestamp - the moment producing started). The progress shown starts once the group settled.
    """
    extra = [WorkerProcess(settings, stack.workdir, f"bench-{modality}-{i}") for i in range(1, count)]
    group = [follower.worker, *extra]
    try:
        for wp in extra:
            wp.start()
        stages.wait_group_settled(group, stack.partitions, clocks.wall, clocks.sleep)
        scaled = rekey(messages, "scale")
        rows, seconds, by_worker = burst(settings, group, follower, scaled, b"scale-", start_progress(), clocks)
    finally:
        for wp in extra:
            wp.terminate()
    return StageResult(rows, seconds, {"workers": count, "embedded_by": by_worker})


def group_backlog(
    stack: LocalStack,
    settings: Settings,
    follower: Follower,
    count: int,
    messages: list[Message],
    modality: str,
    progress: Progress,
    clocks: Clocks,
) -> StageResult:
    """A backlog drained by ``count`` workers of one consumer group started together, as a deployment
    scaled out ahead of a backlog: ``backlog`` with a group instead of one worker.

    The backlog goes on a topic of its own, read by a group of its own, so the stage's single worker
    is not part of it. Throughput = N / (last output's timestamp - the moment the first member was
    assigned partitions): the group's joins and rebalances count against it.
    """
    k = settings.kafka.model_copy(
        update={"input_topic": f"bench.group.{modality}", "group_id": f"{settings.kafka.group_id}-group"}
    )
    ensure_topics(k, {k.input_topic: stack.partitions})
    group_settings = settings.model_copy(update={"kafka": k})
    backlog = rekey(messages, "group")
    stages.produce_burst(k, k.input_topic, backlog, clocks.wall)
    members = [WorkerProcess(group_settings, stack.workdir, f"bench-{modality}-group-{i}") for i in range(count)]
    try:
        for wp in members:
            wp.start()
        first = stages.wait_assigned(members, clocks.wall, clocks.sleep)
        stages.wait_embedded(members, len(backlog), WAIT_TIMEOUT_S, progress, clocks.sleep)
        by_worker = [stages.worker_counters(wp)[0] for wp in members]
        rows = follower.wait_for(b"group-", len(backlog), WAIT_TIMEOUT_S, stages.no_progress)
    finally:
        for wp in members:
            wp.terminate()
    return StageResult(len(rows), max(rows.values()) / 1000 - first, {"workers": count, "embedded_by": by_worker})


def burst(
    settings: Settings,
    group: Sequence[WorkerProcess],
    follower: Follower,
    messages: list[Message],
    prefix: bytes,
    progress: Progress,
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


def points(settings: Settings, follower: Follower, w: Workload, progress: Progress, clocks: Clocks) -> StageResult:
    """Observations, one point a message, produced into the running worker, which windows them.

    Throughput in points (messages) = N / (last window's output timestamp - the moment producing
    started). A series' windows share its key, so they are told apart by row id.
    """
    per_window = len(w.points) // w.point_windows

    def points_done(windows: int) -> None:
        progress(windows * per_window)

    group = [follower.worker]
    rows, seconds, _ = burst(
        settings, group, follower, w.points, b"points-", points_done, clocks, rows_expected=w.point_windows, by_id=True
    )
    return StageResult(len(w.points), seconds, {"windows": rows, "series": POINT_SERIES})


def paced(
    settings: Settings,
    follower: Follower,
    messages: list[Message],
    rate: float,
    progress: Progress,
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
