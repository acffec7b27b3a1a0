"""The benchmark's pure parts: ratios, the latency bound, targets, the JSON shape and the plots."""

import json
import time

import pytest

from embedstream.config import load_settings
from embedstream.local.bench.plots import latency_plot, throughput_plot
from embedstream.local.bench.report import (
    STAGES,
    ModalityBench,
    StageResult,
    latency_bound,
    ratio,
    report_json,
    shared_ceiling,
    summary_table,
    targets,
)
from embedstream.local.bench.stages import paced_linger_ms
from embedstream.local.bench.workload import POINT_SERIES, observation_traffic
from embedstream.modalities import modality_for
from embedstream.records import Deferred, SourceMessage
from embedstream.service import encoder_spec


def _bench(modality: str = "image", **overrides) -> ModalityBench:
    b = ModalityBench(
        modality=modality,
        model="image-mobilenetv3_small_100",
        null_model="null-image-mobilenetv3_small_100",
        max_batch=32,
        max_wait_ms=20,
        max_in_flight=2,
        torch_threads=1,
        instances=2,
        cpus=2,
    )
    b.stages = {
        "bare": StageResult(320, 2.0),  # 160/s
        "bare_torchscript": StageResult(320, 2.0),  # 160/s: the runtime served by default
        "bare_onnx": StageResult(320, 1.0),  # 320/s
        "decode": StageResult(320, 1.0),  # 320/s on one thread
        "triton": StageResult(320, 2.5),  # 128/s
        "perf_analyzer": StageResult(640, 4.0, {"p50_latency_ms": 250.4, "p99_latency_ms": 399.5}),  # 160/s
        "pipeline": StageResult(320, 2.5),  # 128/s
        "pipeline_live": StageResult(320, 2.56),  # 125/s
        "pipeline_half": StageResult(320, 5.0),
        "pipeline_points": StageResult(1600, 0.4, {"windows": 50, "series": 50}),
        "pipeline_scaled": StageResult(320, 1.6, {"workers": 2}),  # 200/s
        "pipeline_group": StageResult(320, 1.0, {"workers": 2, "embedded_by": [170, 150]}),  # 320/s
        "null": StageResult(320, 0.8),  # 400/s
        "raw_kafka": StageResult(320, 0.2),  # 1600/s
        "raw_consume": StageResult(320, 0.1),  # 3200/s
        "sink_lancedb": StageResult(320, 0.2, {"vs_raw_consume": 0.5}),  # 1600 rows/s
        "by_reference": StageResult(320, 2.8, {"inline_per_s": 128.0, "vs_inline": 0.89}),
        "peer": StageResult(320, 5.0, {"mean_batch": 32.0}),  # 64/s
        "peer_onnx": StageResult(320, 4.0, {"mean_batch": 32.0}),  # 80/s: the better peer
    }
    b.offered_rate = 64.0
    b.latencies_ms = [float(v) for v in range(1, 101)]
    b.embedded, b.batches = 320, 20
    for k, v in overrides.items():
        setattr(b, k, v)
    return b


def test_ratio_is_zero_without_a_denominator():
    assert ratio(3.0, 0.0) == 0.0
    assert ratio(3.0, 4.0) == 0.75


def test_stage_throughput():
    assert StageResult(100, 4.0).throughput == 25.0
    assert StageResult(100, 0.0).throughput == 0.0


def test_latency_bound_caps_fill_time_at_max_wait():
    # 32 at 64/s would take 500 ms to fill; max_wait cuts it at 20 ms, when 1.28 rows have arrived.
    lb = latency_bound(32, 20, 64.0, 160.0)
    assert lb.fill_ms == pytest.approx(20.0)
    assert lb.batch == pytest.approx(1.28)
    assert lb.model_ms == pytest.approx(8.0)
    assert lb.bound_ms == pytest.approx(20.0 + 2 * 8.0)  # the wait plus two batch service times


def test_latency_bound_fills_the_batch_when_the_rate_is_high():
    lb = latency_bound(16, 20, 3200.0, 1600.0)
    assert lb.fill_ms == pytest.approx(5.0)
    assert lb.batch == pytest.approx(16.0)
    assert lb.model_ms == pytest.approx(10.0)
    assert lb.bound_ms == pytest.approx(25.0)


def test_latency_bound_counts_at_least_one_row_per_batch():
    assert latency_bound(32, 20, 10.0, 100.0).batch == 1.0


def test_targets_pass_and_miss():
    t = targets(_bench())
    assert t["pipeline_vs_bare"].value == pytest.approx(0.8)
    assert t["pipeline_vs_bare"].passed is False
    assert t["null_vs_raw_kafka"].value == pytest.approx(0.25)
    assert t["null_vs_raw_kafka"].passed is False
    p99 = t["p99_at_half_load"]
    assert p99.target == pytest.approx(36.0) and p99.value > 99 and p99.passed is False
    assert t["batch_fill"].value == pytest.approx(0.5) and t["batch_fill"].passed is None

    fast = _bench(latencies_ms=[10.0] * 50)
    fast.stages["pipeline"] = StageResult(320, 2.1)
    fast.stages["raw_kafka"] = StageResult(320, 0.5)
    t = targets(fast)
    assert t["pipeline_vs_bare"].passed and t["null_vs_raw_kafka"].passed and t["p99_at_half_load"].passed


def test_pipeline_over_bare_uses_the_served_runtime_and_eager_is_reported_beside_it():
    t = targets(_bench())  # served: TorchScript, 160/s like eager
    assert t["pipeline_vs_bare"].value == pytest.approx(128.0 / 160.0)
    assert "torchscript" in t["pipeline_vs_bare"].name
    assert t["bare_onnx_vs_eager"].value == pytest.approx(2.0) and t["bare_onnx_vs_eager"].passed is None
    onnx = _bench(served_runtime="onnxruntime")
    t = targets(onnx)
    assert onnx.served_bare == "bare_onnx" and "onnxruntime" in t["pipeline_vs_bare"].name
    assert t["pipeline_vs_bare"].value == pytest.approx(128.0 / 320.0) and t["pipeline_vs_bare"].passed is False
    assert t["pipeline_vs_bare_eager"].value == pytest.approx(128.0 / 160.0)
    # the ceiling and the scaled-out figure compare with the same runtime
    assert t["pipeline_scaled_vs_bare"].value == pytest.approx(200.0 / 320.0)
    # a served runtime whose stage did not run (no onnxruntime here) falls back to torch eager
    del onnx.stages["bare_onnx"]
    assert onnx.served_bare == "bare" and "torch eager" in targets(onnx)["pipeline_vs_bare"].name
    assert "pipeline_vs_bare_eager" not in targets(onnx)


def test_the_pipeline_is_held_to_at_least_the_naive_peer():
    t = targets(_bench())["pipeline_vs_peer"]
    assert t.value == pytest.approx(128.0 / 64.0) and t.passed is True
    slow = _bench()
    slow.stages["pipeline"] = StageResult(320, 6.0)
    assert targets(slow)["pipeline_vs_peer"].passed is False


def test_triton_alone_is_compared_with_perf_analyzer_without_a_target():
    t = targets(_bench())["triton_vs_perf_analyzer"]
    assert t.value == pytest.approx(128.0 / 160.0)
    assert t.passed is None and t.detail == "128.0 / 160.0 msg/s"


def test_the_shared_ceiling_adds_model_and_decode_cpu_seconds():
    # 160/s keeping 2 cores busy = 12.5 core-ms a message; decoding 320/s on one core = 3.125 core-ms.
    assert shared_ceiling(160.0, 320.0, 2) == pytest.approx(2 / (12.5e-3 + 3.125e-3))
    assert shared_ceiling(160.0, 0.0, 2) == 0.0
    t = targets(_bench())
    assert t["pipeline_vs_ceiling"].value == pytest.approx(128.0 / 128.0)
    assert t["pipeline_vs_ceiling"].passed is None  # reported, not a target


def test_targets_skip_what_was_not_measured():
    b = _bench(latencies_ms=[], batches=0)
    del b.stages["null"], b.stages["decode"]
    del b.stages["perf_analyzer"], b.stages["pipeline_scaled"]
    del b.stages["bare_torchscript"], b.stages["bare_onnx"], b.stages["peer"], b.stages["peer_onnx"]
    assert set(targets(b)) == {"pipeline_vs_bare"}


def test_scaled_out_pipeline_is_held_to_the_pipeline_target_and_compared_with_one_worker():
    t = targets(_bench())
    assert t["pipeline_scaled_vs_bare"].value == pytest.approx(200.0 / 160.0)
    assert t["pipeline_scaled_vs_bare"].passed is True
    assert t["pipeline_scaled_vs_bare"].detail.startswith("2 workers: ")
    assert t["scale_out"].value == pytest.approx(200.0 / 125.0) and t["scale_out"].passed is None
    no_live = _bench()
    del no_live.stages["pipeline_live"]  # the one worker timed with the messages arriving is the denominator
    assert "scale_out" not in targets(no_live) and "pipeline_scaled_vs_bare" in targets(no_live)


def test_report_json_shape():
    doc = report_json([_bench(), _bench("text")], {"started_at": "2024-01-01T00:00:00+00:00"})
    json.dumps(doc)  # plain JSON types only
    assert doc["schema"] == "embedstream.local.bench/1" and doc["started_at"]
    assert set(doc["modalities"]) == {"image", "text"}
    image = doc["modalities"]["image"]
    assert set(image["stages"]) == set(STAGES)
    assert all(s["throughput"] > 0 for s in image["stages"].values())
    assert image["stages"]["pipeline"]["mean_batch"] == 16.0
    half = image["stages"]["pipeline_half"]
    assert half["offered_rate"] == 64.0 and len(half["latencies_ms"]) == 100
    assert half["latency_ms"]["p50"] == pytest.approx(50.5)
    assert set(image["targets"]) == {
        "triton_vs_perf_analyzer",
        "pipeline_vs_bare",
        "pipeline_vs_bare_eager",
        "bare_torchscript_vs_eager",
        "bare_onnx_vs_eager",
        "pipeline_vs_peer",
        "pipeline_vs_best_peer",
        "pipeline_scaled_vs_bare",
        "pipeline_group_vs_best_peer",
        "scale_out",
        "pipeline_vs_ceiling",
        "null_vs_raw_kafka",
        "p99_at_half_load",
        "batch_fill",
    }
    assert image["targets"]["pipeline_vs_bare"]["passed"] is False
    # 128/s against the better of the two peers (80/s), held to the modality's target (1.5 for images).
    best = image["targets"]["pipeline_vs_best_peer"]
    assert best["value"] == pytest.approx(1.6) and best["passed"] is True and "peer_onnx" in best["detail"]
    group = image["targets"]["pipeline_group_vs_best_peer"]
    assert group["value"] == pytest.approx(4.0) and group["detail"].startswith("2 workers, peer_onnx: ")
    assert image["served_runtime"] == "torchscript" and image["served_bare_stage"] == "bare_torchscript"


def test_summary_table_has_a_row_per_stage_and_target():
    table = summary_table([_bench(), _bench("text")])
    assert len(table.columns) == 3
    # a row per stage, the two latency rows, a row per target
    assert table.row_count == len(STAGES) + 2 + 14
    one_worker = _bench()
    del one_worker.stages["pipeline_scaled"], one_worker.stages["pipeline_group"]
    # without --workers there are no scaled-out rows of dashes, nor their three ratios
    assert summary_table([one_worker]).row_count == len(STAGES) - 2 + 2 + 11


def test_plots_write_pngs(tmp_path):
    results = [_bench(), _bench("timeseries", latencies_ms=[])]
    for path in (throughput_plot(results, tmp_path / "t.png"), latency_plot(results, tmp_path / "l.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


def test_null_encoder_takes_the_real_inputs_and_returns_zeros():
    import torch

    from embedstream.config import EncoderSettings
    from embedstream.encoders import get_family

    real = EncoderSettings(family="autoencoder", arch="w16c3h16l4", weights="random")
    fake = EncoderSettings(family="null", arch="autoencoder/w16c3h16l4", weights="random")
    want, got = get_family("autoencoder").describe(real), get_family("null").describe(fake)
    assert got.inputs == want.inputs and got.modality == want.modality and got.extra["imitates"] == want.name
    assert got.outputs == want.outputs[:1] and got.name == f"null-{want.name}"
    out = get_family("null").build(fake)(torch.randn(5, 16, 3))
    assert out.shape == (5, 4) and not out.any()


@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "null/x", "nosuch/x", "cnn/"])
def test_null_encoder_refuses_an_arch_that_names_no_real_encoder(arch):
    from embedstream.config import EncoderSettings
    from embedstream.encoders import get_family
    from embedstream.errors import ConfigError

    with pytest.raises(ConfigError):
        get_family("null").describe(EncoderSettings(family="null", arch=arch, weights="random"))


def test_null_twin_and_rekey():
    from embedstream.config import load_settings
    from embedstream.local.bench.workload import null_twin, rekey

    base = load_settings(encoder={"family": "autoencoder", "arch": "w16c3h16l4", "weights": "random"})
    twin = null_twin(base)
    assert twin.encoder.family == "null" and twin.encoder.arch == "autoencoder/w16c3h16l4"
    assert twin.kafka.input_topic == "bench.null.timeseries" and twin.kafka.group_id != base.kafka.group_id
    assert twin.batch == base.batch
    assert rekey([(b"a", b"x"), (b"b", b"y")], "sat") == [(b"sat-000000", b"x"), (b"sat-000001", b"y")]


def test_latency_bound_uses_the_measured_model_time_of_the_batch_it_got():
    b = _bench(half_batch=3.0, half_batch_model_ms=30.0)
    t = targets(b)["p99_at_half_load"]
    assert t.target == pytest.approx(20.0 + 2 * 30.0)
    assert "measured" in t.detail and "batch of 3.0" in t.detail


def test_observation_traffic_closes_exactly_the_windows_it_promises():
    settings = load_settings(encoder={"family": "autoencoder", "arch": "w16c3h16l4", "weights": "random"})
    points, windows = observation_traffic(settings, 1000)
    assert len(points) >= 1000 and len(points) % (POINT_SERIES * 16) == 0
    assert windows == len(points) // 16
    modality = modality_for(encoder_spec(settings), settings)
    # each series keyed to itself, so the worker sees it on one partition, in order
    assert len({key for key, _ in points}) == POINT_SERIES
    out = [modality.decode(SourceMessage("t", 0, i, k, v, 0)) for i, (k, v) in enumerate(points)]
    assert all(isinstance(d, Deferred) and not d.dead_letters for d in out)
    assert sum(d.item is not None for d in out) == windows
    assert modality.windows.open_points() == 0  # nothing left waiting for a later point


def _workload(points: int = 0):
    from embedstream.local.bench.workload import Workload

    settings = load_settings()
    messages = [(f"k{i}".encode(), b"v") for i in range(40)]
    w = Workload("timeseries" if points else "image", settings, settings, messages)
    w.points = [(b"p", b"v")] * points
    w.point_windows = points // 16
    return w


def _options(workers: int = 1, plumbing_count: int = 100):
    from pathlib import Path

    from embedstream.local.bench.table import BenchOptions

    return BenchOptions(["image"], {"image": 40}, Path("out"), Path("work"), 4, plumbing_count, workers)


def test_the_stage_table_is_the_report_order():
    from embedstream.local.bench.table import STAGE_TABLE

    assert [s.name for s in STAGE_TABLE] == list(STAGES)


def test_stages_apply_by_workload_and_options_with_their_progress_totals():
    from embedstream.local.bench.table import STAGE_TABLE

    def plan(w, opts):
        return {s.name: s.total(w, opts) for s in STAGE_TABLE if s.applies(w, opts)}

    from embedstream.local.bench.served import onnx_available

    one = plan(_workload(), _options())
    no_onnx = set() if onnx_available() else {"bare_onnx", "peer_onnx"}  # ONNX stages need the models extra
    assert set(one) == set(STAGES) - {"pipeline_points", "pipeline_scaled", "pipeline_group"} - no_onnx
    assert one["pipeline"] == 40 and one["null"] == one["raw_kafka"] == one["raw_consume"] == 100
    assert one["sink_lancedb"] == 100  # a few thousand rows by default: the plumbing count, bounded
    assert one["decode"] == 100  # decode is timed on the plumbing count: the model's passes too fast
    assert one["peer"] == 40  # the workload's messages, like the pipeline
    scaled = plan(_workload(points=160), _options(workers=3, plumbing_count=10))
    assert set(scaled) == set(STAGES) - no_onnx - {"by_reference"}  # references are images only
    assert scaled["pipeline_points"] == 160 and scaled["pipeline_scaled"] == 120
    assert scaled["pipeline_group"] == 40  # the workload once, drained by the group
    from embedstream.local.bench.counts import DEFAULT_PLUMBING

    # --plumbing-count 0 (the command's default): each modality's own count, seconds of its fastest stage
    assert plan(_workload(), _options(plumbing_count=0))["null"] == DEFAULT_PLUMBING["image"]
    assert scaled["null"] == 40  # never fewer than the workload's own messages


def test_the_bench_loop_runs_the_applicable_stages_in_order(monkeypatch):
    from types import SimpleNamespace

    from embedstream.local.bench import run
    from embedstream.local.bench.table import Stage

    calls: list[str] = []
    ctx = SimpleNamespace(bench=_bench())
    ctx.bench.stages = {}
    ctx.close = lambda: calls.append("close")

    def stage(name, **kw):
        return Stage(name, lambda c: calls.append(name) or StageResult(len(calls), 1.0), **kw)

    table = (
        stage("a", note=lambda c, r: f"note {r.messages}"),
        stage("skipped", applies=lambda w, o: False),
        stage("b", after=lambda c: calls.append("after b"), measured_total=True),
    )
    monkeypatch.setattr(run, "STAGE_TABLE", table)
    monkeypatch.setattr(run, "open_context", lambda *a: ctx)
    monkeypatch.setattr(run, "prepare", lambda c: calls.append("prepare"))
    done: list[tuple] = []
    board = SimpleNamespace(advance=None, done=lambda m, s, r, note: done.append((m, s.name, r.messages, note)))
    b = run._bench_modality(None, _workload(), board, run.Clocks(), _options())
    assert calls == ["prepare", "a", "b", "after b", "close"]
    assert list(b.stages) == ["a", "b"] and b.stages["b"].messages == 3
    assert done == [("image", "a", 2, "note 2"), ("image", "b", 3, "")]


def test_startup_variants_name_a_code_tree_and_an_interpreter():
    from embedstream.local.bench.startup import Variant

    assert Variant.parse("before=/tmp/old/workers") == Variant("before", "/tmp/old/workers", None)
    assert Variant.parse("core=,/venv/bin/python") == Variant("core", None, "/venv/bin/python")
    assert Variant.parse("plain") == Variant("plain", None, None)


def test_the_bench_and_the_startup_bench_measure_the_default_image_encoder_with_its_packaged_weights(tmp_path):
    from embedstream.cli_support import local_settings
    from embedstream.encoders import has_packaged_weights
    from embedstream.local.bench import startup
    from embedstream.local.bench.workload import build_workload

    w = build_workload(local_settings(None), "image", 8, tmp_path)
    assert encoder_spec(w.settings).name == "image-tf_efficientnet_lite0"
    assert w.settings.encoder.weights is None and has_packaged_weights(w.settings.encoder)
    variant = load_settings(None, **startup.PIPELINES["image"])
    assert variant.encoder == w.settings.encoder


def test_bench_refuses_an_image_encoder_without_weights_before_starting_anything(tmp_path, caplog):
    import logging

    from embedstream.cli import main

    config = tmp_path / "worker.toml"
    config.write_text('[encoder]\narch = "mobilenetv3_small_100"\n')
    argv = ["bench", "--config", str(config), "--modalities", "image", "--workdir", str(tmp_path / "w")]
    with caplog.at_level(logging.ERROR, logger="embedstream"):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "encoder.weights is not set" in caplog.text
    assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists()


def test_the_served_runtime_is_read_from_the_exported_model(tmp_path):
    from embedstream.local.bench.served import served_runtime

    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.pt").write_bytes(b"")
    (tmp_path / "m" / "config.pbtxt").write_text('backend: "python"\n')
    assert served_runtime(tmp_path / "m") == "torchscript"
    (version / "model.onnx").write_bytes(b"")
    assert served_runtime(tmp_path / "m") == "torchscript"  # exported beside it, not what the config runs
    (tmp_path / "m" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    assert served_runtime(tmp_path / "m") == "onnxruntime"
    (version / "model.pt").unlink()
    (tmp_path / "m" / "config.pbtxt").write_text('backend: "python"\n')
    assert served_runtime(tmp_path / "m") == "onnxruntime"  # the only file there is


def _cosines(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["text", "image"])
def test_the_naive_peer_embeds_raw_messages_as_the_pipeline_does(tmp_path, modality):
    """Its own decode (tokenizer with padding; PIL and timm's transform) and the same weights give the
    served embeddings: the peer does the same work, so its rate is a fair comparison."""
    import numpy as np

    from embedstream.local.bench.peer import build_peer, embed_batch
    from embedstream.local.bench.stages import _eager_model
    from embedstream.local.bench.workload import build_workload, preprocessed_batches

    w = build_workload(load_settings(), modality, 8, tmp_path)
    model, decode = build_peer(w.settings)
    raw = embed_batch(model, decode, [v for _, v in w.messages])
    ours = _eager_model(w.settings).infer(preprocessed_batches(w.settings, w.messages)[0])
    want = next(iter(ours.values()))
    got = np.frombuffer(raw, dtype=np.float32).reshape(want.shape)
    assert _cosines(got, want).min() > 0.9999


@pytest.mark.slow
def test_the_bare_runtimes_run_the_exported_model_on_the_bench_batches(tmp_path):
    """TorchScript from the model repository and ONNX Runtime (exported for the bench when the stack
    serves TorchScript) return the eager embeddings, timed on every batch."""
    from embedstream.export import export_model, local_cpu_target
    from embedstream.local.bench import served
    from embedstream.local.bench.stages import _eager_model, bare_model
    from embedstream.local.bench.workload import build_workload, preprocessed_batches

    w = build_workload(load_settings(), "text", 40, tmp_path)
    batches = preprocessed_batches(w.settings, w.messages)
    spec = export_model(w.settings.encoder, tmp_path / "models", local_cpu_target(artifact="torchscript"))
    model_dir = tmp_path / "models" / spec.name
    assert served.served_runtime(model_dir) == "torchscript"
    want = next(iter(_eager_model(w.settings).infer(batches[0]).values()))
    assert served.torchscript_file(w.settings, model_dir, tmp_path) == model_dir / "1" / "model.pt"
    factories = {"torchscript": served.torchscript_model(model_dir / "1" / "model.pt", spec)}
    if served.onnx_available():
        path = served.onnx_file(w.settings, model_dir, batches[0], tmp_path)
        assert path.is_relative_to(tmp_path / "bench-onnx")  # not put among the served files
        factories["onnxruntime"] = served.onnx_model(path, spec)
    for runtime, factory in factories.items():
        got = next(iter(factory(1).infer(batches[0]).values()))
        assert _cosines(got, want).min() > 0.9999, runtime
        counted: list[int] = []
        res = bare_model(w.settings, batches, 2, 1, time.perf_counter, counted.append, factory)
        assert res.messages == sum(counted) == 40 and res.throughput > 0, runtime


@pytest.mark.slow
def test_a_stack_serving_onnx_still_gets_a_torchscript_bare_figure(tmp_path):
    """No ``model.pt`` among the served files: the bench traces one of its own rather than failing."""
    from embedstream.local.bench import served
    from embedstream.local.bench.workload import build_workload

    w = build_workload(load_settings(), "timeseries", 8, tmp_path)
    path = served.torchscript_file(w.settings, tmp_path / "models" / "absent", tmp_path)
    assert path.is_relative_to(tmp_path / "bench-torchscript") and path.name == "model.pt"


def test_the_paced_producer_lingers_only_for_a_stream():
    assert paced_linger_ms(70.0) == 0  # images at half load: each message leaves at once
    assert paced_linger_ms(250.0) == 0
    assert paced_linger_ms(10_000.0) == 5  # time series: one-message requests fell behind here
