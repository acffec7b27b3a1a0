"""``embedstream bench`` end to end for one modality with tiny counts, on a stack of its own."""

from __future__ import annotations

import json

import pytest

from embedstream.cli import main
from embedstream.local.bench.report import STAGES
from embedstream.local.bench.served import onnx_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_timeseries_writes_every_stage_and_the_plots(tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "bench",
            "--modalities",
            "timeseries",
            "--count",
            "48",
            "--plumbing-count",
            "100",
            "--workers",
            "2",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "stack"),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    ts = doc["modalities"]["timeseries"]
    images_only = {"by_reference"}
    assert set(ts["stages"]) == set(STAGES) - images_only - (set() if onnx_available() else {"bare_onnx", "peer_onnx"})
    for name, stage in ts["stages"].items():
        if name != "perf_analyzer":  # it sends as many requests as its measurement windows take
            want = {"null": 100, "raw_kafka": 100, "raw_consume": 100, "decode": 100, "pipeline_scaled": 96}
            want["sink_lancedb"] = 100  # rows stored by `sink lancedb`, each once
            want["pipeline_points"] = 1600
            want = want.get(name, 48)
            assert stage["messages"] == want, name
        assert stage["messages"] > 0, name
        assert stage["throughput"] > 0, name
    sink = ts["stages"]["sink_lancedb"]
    assert sink["raw_consume_rows_per_s"] > 0 and sink["vs_raw_consume"] == pytest.approx(
        sink["throughput"] / sink["raw_consume_rows_per_s"]
    )
    pa = ts["stages"]["perf_analyzer"]
    assert pa["batch"] == ts["max_batch"] and pa["concurrency"] == ts["max_in_flight"]
    assert pa["shared_memory"] == "system"  # fixed-size windows on the same host, as the worker sends them
    assert 0 < pa["p50_latency_ms"] <= pa["p99_latency_ms"]
    assert pa["messages"] == pa["requests"] * pa["batch"]
    assert len(ts["stages"]["pipeline_half"]["latencies_ms"]) == 48
    assert ts["stages"]["pipeline"]["batches"] > 0
    assert ts["stages"]["pipeline"]["worker_cpu_us_per_message"] > 0  # the worker's CPU over the stage, from /proc
    # the hand-written peer read every message once, in batches no larger than ours, and committed them
    for name in ("peer", "peer_onnx") if onnx_available() else ("peer",):
        peer = ts["stages"][name]
        assert peer["batches"] >= 48 / ts["max_batch"] and 0 < peer["mean_batch"] <= ts["max_batch"], name
    # pipeline / bare is taken against the runtime Triton serves, torch eager reported beside it
    assert (
        ts["served_bare_stage"] == {"torchscript": "bare_torchscript", "onnxruntime": "bare_onnx"}[ts["served_runtime"]]
    )
    # 50 series x 32 points: one window each, every one published (told apart by row id, not key)
    assert ts["stages"]["pipeline_points"]["windows"] == 50
    scaled = ts["stages"]["pipeline_scaled"]
    # both members of the group took their share of the partitions, and nothing was embedded twice
    assert scaled["workers"] == 2 and len(scaled["embedded_by"]) == 2
    assert min(scaled["embedded_by"]) > 0 and sum(scaled["embedded_by"]) == 96
    # the one worker was also timed with the messages arriving, and half load is half the slower rate
    live = ts["stages"]["pipeline_live"]
    half_of = min(live["throughput"], ts["stages"]["pipeline"]["throughput"]) / 2
    assert ts["stages"]["pipeline_half"]["offered_rate"] == pytest.approx(half_of)
    want = {
        "triton_vs_perf_analyzer",
        "pipeline_vs_bare",
        "pipeline_vs_bare_eager",
        "bare_torchscript_vs_eager",
        "pipeline_vs_peer",
        "pipeline_vs_best_peer",
        "pipeline_scaled_vs_bare",
        "scale_out",
        "pipeline_vs_ceiling",
        "null_vs_raw_kafka",
        "p99_at_half_load",
        "batch_fill",
    }
    assert want <= set(ts["targets"])
    for png in ("throughput.png", "latency.png"):
        assert (out / png).stat().st_size > 5000
