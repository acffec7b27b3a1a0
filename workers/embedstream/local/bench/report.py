"""What a benchmark run measured, the ratios and targets derived from it, and its JSON and table forms.

Nothing here touches a broker or a server, so the arithmetic is unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    # rich comes with the optional ``tools`` extra: imported where the table is drawn.
    from rich.table import Table

SCHEMA = "embedstream.local.bench/1"
# Stage keys in the order they run; the labels are what tables and plots show.
STAGES: dict[str, str] = {
    "bare": "bare model in-process, torch eager",
    "bare_torchscript": "bare model in-process, exported TorchScript",
    "bare_onnx": "bare model in-process, ONNX Runtime",
    "decode": "decode alone, 1 thread",
    "triton": "Triton alone (no Kafka)",
    "perf_analyzer": "perf_analyzer (Triton's own client)",
    "pipeline": "pipeline at saturation",
    "pipeline_live": "pipeline at saturation, messages arriving",
    "pipeline_half": "pipeline at 50% load",
    "pipeline_points": "pipeline, one observation a message, arriving",
    "pipeline_scaled": "pipeline at saturation, --workers in one group",
    "pipeline_group": "pipeline on a backlog, --workers in one group",
    "null": "null encoder pipeline",
    "raw_kafka": "raw kafka-python consume+produce",
    "raw_consume": "raw kafka-python consume alone",
    "sink_lancedb": "sink lancedb, rows into a LanceDB table (rows/s)",
    "by_reference": "pipeline, images as s3:// references (fetched, overlapped with inference)",
    "peer": "naive peer: kafka-python -> torch in-process -> produce, 1 process",
    "peer_onnx": "strongest peer: kafka-python -> the worker's decode -> ONNX Runtime in-process -> produce",
}
PIPELINE_VS_BARE_TARGET = 0.9
NULL_VS_RAW_TARGET = 0.5
# The pipeline should at least match what a user would hand-write in one process.
PIPELINE_VS_PEER_TARGET = 1.0
# The in-process stage that times each runtime the stack may serve.
RUNTIME_STAGE: dict[str, str] = {"torchscript": "bare_torchscript", "onnxruntime": "bare_onnx"}
# p99 at 50% load may be the batch wait plus two batch service times: the batch the message is in,
# and the one ahead of it at the model.
SERVICE_TIMES = 2


@dataclass
class StageResult:
    """One stage of one modality: ``messages`` rows (or messages) in ``seconds``; extras per stage."""

    messages: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "seconds": self.seconds, "throughput": self.throughput, **self.extra}


@dataclass
class ModalityBench:
    modality: str
    model: str
    null_model: str
    max_batch: int
    max_wait_ms: int
    max_in_flight: int
    torch_threads: int
    instances: int = 1  # Triton instances of the served model
    cpus: int = 1
    stages: dict[str, StageResult] = field(default_factory=dict)
    # Per-message latency at 50% load (output timestamp - input timestamp), ms.
    latencies_ms: list[float] = field(default_factory=list)
    offered_rate: float = 0.0
    # Mean batch the worker sent at 50% load, and what one served instance needs for such a batch (ms).
    half_batch: float = 0.0
    half_batch_model_ms: float | None = None
    # From the worker's /readyz counters across the saturation stage.
    embedded: int = 0
    batches: int = 0
    # What Triton runs for this model ("torchscript" or "onnxruntime"): pipeline / bare uses its stage.
    served_runtime: str = "torchscript"
    # pipeline / the better peer at least this (the modality's ``bench_peer_target``).
    best_peer_target: float = 1.5

    @property
    def served_bare(self) -> str:
        """The bare stage of the served runtime when it ran, else torch eager's."""
        key = RUNTIME_STAGE.get(self.served_runtime, "bare")
        return key if key in self.stages else "bare"

    @property
    def mean_batch(self) -> float:
        return self.embedded / self.batches if self.batches else 0.0


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    target: float | None
    # "ge": value should be at least target; "le": at most; None: reported, no target.
    sense: str | None
    detail: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.sense is None:
            return None
        return self.value >= self.target if self.sense == "ge" else self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "target": self.target,
            "sense": self.sense,
            "passed": self.passed,
            "detail": self.detail,
        }


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


@dataclass(frozen=True)
class LatencyBound:
    """What a batching pipeline should need at an offered rate, from the batch it waits for and the model."""

    fill_ms: float
    batch: float
    model_ms: float

    @property
    def bound_ms(self) -> float:
        return self.fill_ms + SERVICE_TIMES * self.model_ms


def latency_bound(max_batch: int, max_wait_ms: float, offered_rate: float, bare_throughput: float) -> LatencyBound:
    """Fill time = max_batch / rate capped by max_wait; the batch is what arrives meanwhile (at least 1).

    Model time is that batch at the bare model's throughput: the second service time then leaves room for
    decode, the RPC and Kafka on top, which the bound deliberately does not model.
    """
    if offered_rate <= 0:
        return LatencyBound(max_wait_ms, 1.0, ratio(1000.0, bare_throughput))
    fill_ms = min(1000.0 * max_batch / offered_rate, max_wait_ms)
    batch = min(float(max_batch), max(1.0, offered_rate * fill_ms / 1000.0))
    return LatencyBound(fill_ms, batch, 1000.0 * ratio(batch, bare_throughput))


def shared_ceiling(bare: float, decode_one_thread: float, cpus: int) -> float:
    """Messages/s when every core either runs the model or decodes: CPU seconds per message add up.

    The bare model keeps all ``cpus`` busy (cpus / bare core-seconds a message), decoding one core
    (1 / decode). On a GPU host the two do not compete and the ceiling is the smaller of the two.
    """
    if bare <= 0 or decode_one_thread <= 0:
        return 0.0
    return 1.0 / (1.0 / bare + 1.0 / (cpus * decode_one_thread))


def _throughput_ratio(name: str, num: float, den: float, at_least: float | None = None, note: str = "") -> Target:
    """``num / den`` of two rates, held to ``at_least`` if given, with both rates in the detail."""
    return Target(
        name, ratio(num, den), at_least, None if at_least is None else "ge", f"{note}{num:.1f} / {den:.1f} msg/s"
    )


def _rate_targets(b: ModalityBench) -> dict[str, Target]:
    """The throughput ratios of the stages that ran, in the order the report shows them."""
    s = b.stages
    rate = {name: r.throughput for name, r in s.items()}
    out: dict[str, Target] = {}
    bare = b.served_bare
    served = "torch eager" if bare == "bare" else b.served_runtime
    if "pipeline" in s and bare in s:
        out["pipeline_vs_bare"] = _throughput_ratio(
            f"pipeline / bare ({served}, as served)", rate["pipeline"], rate[bare], PIPELINE_VS_BARE_TARGET
        )
    if "pipeline" in s and "bare" in s and bare != "bare":
        out["pipeline_vs_bare_eager"] = _throughput_ratio(
            "pipeline / bare (torch eager)", rate["pipeline"], rate["bare"]
        )
    for runtime, key in RUNTIME_STAGE.items():
        if key in s and "bare" in s:
            out[f"{key}_vs_eager"] = _throughput_ratio(f"bare {runtime} / torch eager", rate[key], rate["bare"])
    if "pipeline" in s and "peer" in s:
        out["pipeline_vs_peer"] = _throughput_ratio(
            "pipeline / naive peer", rate["pipeline"], rate["peer"], PIPELINE_VS_PEER_TARGET
        )
    peers: list[str] = [p for p in ("peer", "peer_onnx") if p in s]
    best = max(peers, key=rate.__getitem__) if peers else None
    if "pipeline" in s and best:
        out["pipeline_vs_best_peer"] = _throughput_ratio(
            "pipeline / best peer", rate["pipeline"], rate[best], b.best_peer_target, f"{best}: "
        )
    if "pipeline_group" in s and best:
        n = s["pipeline_group"].extra.get("workers", "N")
        out["pipeline_group_vs_best_peer"] = _throughput_ratio(
            "pipeline, --workers on a backlog / best peer",
            rate["pipeline_group"],
            rate[best],
            b.best_peer_target,
            f"{n} workers, {best}: ",
        )
    if "pipeline_scaled" in s and bare in s:
        n = s["pipeline_scaled"].extra.get("workers", "N")
        out["pipeline_scaled_vs_bare"] = _throughput_ratio(
            "pipeline, --workers in one group / bare",
            rate["pipeline_scaled"],
            rate[bare],
            PIPELINE_VS_BARE_TARGET,
            f"{n} workers: ",
        )
    if "pipeline_scaled" in s and "pipeline_live" in s:
        out["scale_out"] = _throughput_ratio(
            "--workers / 1 worker, timed the same way", rate["pipeline_scaled"], rate["pipeline_live"]
        )
    if "triton" in s and "perf_analyzer" in s:
        out["triton_vs_perf_analyzer"] = _throughput_ratio(
            "Triton alone, our client / perf_analyzer", rate["triton"], rate["perf_analyzer"]
        )
    if "pipeline" in s and bare in s and "decode" in s:
        ceiling = shared_ceiling(rate[bare], rate["decode"], b.cpus)
        out["pipeline_vs_ceiling"] = _throughput_ratio(
            "pipeline / (model + decode on the same cores)", rate["pipeline"], ceiling
        )
    if "null" in s and "raw_kafka" in s:
        out["null_vs_raw_kafka"] = _throughput_ratio(
            "null plumbing / raw kafka", rate["null"], rate["raw_kafka"], NULL_VS_RAW_TARGET
        )
    return out


def _p99_target(b: ModalityBench) -> Target:
    lb = latency_bound(b.max_batch, b.max_wait_ms, b.offered_rate, b.stages["bare"].throughput)
    how = "at the bare throughput"
    if b.half_batch_model_ms is not None:
        lb = LatencyBound(lb.fill_ms, b.half_batch, b.half_batch_model_ms)
        how = f"measured on {b.torch_threads} thread(s), one instance"
    return Target(
        "p99 at 50% load (ms)",
        percentile(b.latencies_ms, 99),
        lb.bound_ms,
        "le",
        f"fill {lb.fill_ms:.1f} ms + 2 x model {lb.model_ms:.1f} ms for a batch of {lb.batch:.1f}, {how}",
    )


def targets(b: ModalityBench) -> dict[str, Target]:
    out = _rate_targets(b)
    if b.latencies_ms and "bare" in b.stages:
        out["p99_at_half_load"] = _p99_target(b)
    if b.batches:
        out["batch_fill"] = Target(
            "mean batch / max batch at saturation",
            ratio(b.mean_batch, b.max_batch),
            None,
            None,
            f"{b.embedded} rows in {b.batches} batches (max {b.max_batch})",
        )
    return out


def modality_json(b: ModalityBench) -> dict[str, Any]:
    stages = {name: r.to_json() for name, r in b.stages.items()}
    if "pipeline_half" in stages:
        lat = b.latencies_ms
        stages["pipeline_half"].update(
            offered_rate=b.offered_rate,
            latency_ms={
                "p50": percentile(lat, 50),
                "p99": percentile(lat, 99),
                "mean": float(np.mean(lat)) if lat else 0.0,
                "max": max(lat, default=0.0),
            },
            latencies_ms=[round(v, 1) for v in lat],
        )
    if "pipeline" in stages:
        stages["pipeline"].update(embedded=b.embedded, batches=b.batches, mean_batch=b.mean_batch)
    if "pipeline_half" in stages:
        stages["pipeline_half"].update(mean_batch=b.half_batch, model_ms_at_mean_batch=b.half_batch_model_ms)
    return {
        "model": b.model,
        "null_model": b.null_model,
        "max_batch": b.max_batch,
        "max_wait_ms": b.max_wait_ms,
        "max_in_flight": b.max_in_flight,
        "torch_threads": b.torch_threads,
        "instances": b.instances,
        "cpus": b.cpus,
        "served_runtime": b.served_runtime,
        "served_bare_stage": b.served_bare,
        "stages": stages,
        "targets": {k: t.to_json() for k, t in targets(b).items()},
    }


def report_json(results: Sequence[ModalityBench], meta: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, **meta, "modalities": {b.modality: modality_json(b) for b in results}}


def _verdict(t: Target) -> str:
    if t.passed is None:
        return f"{t.value:.2f}"
    mark = "[green]pass[/]" if t.passed else "[red]miss[/]"
    sense = ">=" if t.sense == "ge" else "<="
    return f"{t.value:.2f} ({sense} {t.target:.2f}) {mark}"


def summary_table(results: Sequence[ModalityBench]) -> Table:
    from rich.table import Table

    table = Table(title="embedstream bench")
    table.add_column("figure")
    for b in results:
        table.add_column(f"{b.modality}\n{b.model}", justify="right")
    for key, label in STAGES.items():
        if not any(key in b.stages for b in results):
            continue  # e.g. the scaled-out stage, run only with --workers above 1
        table.add_row(
            f"{label} (msg/s)",
            *(f"{b.stages[key].throughput:.1f}" if key in b.stages else "-" for b in results),
        )
    table.add_row("latency p50 / p99 at 50% load (ms)", *(_latency_cell(b) for b in results))
    table.add_row("perf_analyzer p50 / p99 per request (ms)", *(_perf_analyzer_cell(b) for b in results))
    all_targets = [targets(b) for b in results]
    names = {k: t.name for ts in all_targets for k, t in ts.items()}
    for key, name in names.items():
        table.add_row(name, *(_verdict(ts[key]) if key in ts else "-" for ts in all_targets))
    return table


def _latency_cell(b: ModalityBench) -> str:
    if not b.latencies_ms:
        return "-"
    return f"{percentile(b.latencies_ms, 50):.0f} / {percentile(b.latencies_ms, 99):.0f}"


def _perf_analyzer_cell(b: ModalityBench) -> str:
    pa = b.stages.get("perf_analyzer")
    if pa is None or "p50_latency_ms" not in pa.extra:
        return "-"
    return f"{pa.extra['p50_latency_ms']:.0f} / {pa.extra['p99_latency_ms']:.0f}"
