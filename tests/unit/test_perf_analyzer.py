"""The perf_analyzer stage without a server: its input data, command line, report parsing and errors."""

import base64
import json
import stat
import sys

import numpy as np
import pytest

from embedstream.config import load_settings
from embedstream.encoders import EncoderSpec, TensorSpec
from embedstream.local.bench import perf_analyzer as pa

# Captured from `embedstream bench` on this stack (perf_analyzer 2.51.0, -b 32, concurrency 2):
# text-all-MiniLM-L6-v2 over the wire, then image-mobilenetv3_small_100 over system shared memory.
TEXT_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,\
Avg latency,request/response,response wait
2,242.814,25,869,330,57,256101,951,6,258425,292455,308060,320396,258342,31,258219
"""
IMAGE_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,\
Avg latency,request/response,response wait
2,94.7753,13,1137,2432,4678,634937,2062,5,615374,899721,921441,943421,645266,18,645202
"""
TEXT_STDOUT = """\
 Successfully read data for 1 stream/streams with 32 step/steps.
*** Measurement Settings ***
  Batch size: 32
  Service Kind: TRITON
  Using "time_windows" mode for stabilization
  Stabilizing using average latency and throughput
  Measurement window: 3000 msec
  Using synchronous calls for inference

Request concurrency: 2
  Client:
    Request count: 82
    Throughput: 242.814 infer/sec
    Avg latency: 258342 usec (standard deviation 29790 usec)
    p50 latency: 258425 usec
    p90 latency: 292455 usec
    p95 latency: 308060 usec
    p99 latency: 320396 usec
    Avg gRPC time: 258250 usec ((un)marshal request/response 31 usec + response wait 258219 usec)
  Server:
    Inference count: 2624
    Execution count: 82
    Successful request count: 82
    Avg request latency: 257449 usec (overhead 9 usec + queue 330 usec + compute input 57 usec + \
compute infer 256101 usec + compute output 951 usec)

Inferences/Second vs. Client Average Batch Latency
Concurrency: 2, throughput: 242.814 infer/sec, latency 258342 usec
"""


def _spec(name: str, *inputs: TensorSpec) -> EncoderSpec:
    out = (TensorSpec("embedding__0", "FP32", (8,)),)
    return EncoderSpec(name, "1", "text", "test", "test", inputs, out, 8, 32)


def _decoded(tensor: dict, dtype: str) -> np.ndarray:
    raw = base64.b64decode(tensor["content"]["b64"])
    return np.frombuffer(raw, dtype=dtype).reshape(tensor["shape"])


def test_input_data_is_one_step_per_row_with_its_shape_and_the_models_dtype(tmp_path):
    spec = _spec("text-x", TensorSpec("input_ids", "INT64", (-1,)), TensorSpec("attention_mask", "INT64", (-1,)))
    ids = np.array([[101, 7592, 102, 0], [101, 2088, 2003, 102]], dtype=np.int32)  # int32 in, INT64 served
    mask = (ids != 0).astype(np.int64)
    doc = json.loads(pa.write_input_data(spec, (ids, mask), tmp_path / "d" / "input.json").read_text())
    assert len(doc["data"]) == 2
    for i, step in enumerate(doc["data"]):
        assert set(step) == {"input_ids", "attention_mask"}
        assert step["input_ids"]["shape"] == [4]  # no batch dimension: perf_analyzer adds it
        np.testing.assert_array_equal(_decoded(step["input_ids"], "int64"), ids[i])
        np.testing.assert_array_equal(_decoded(step["attention_mask"], "int64"), mask[i])


def test_input_data_keeps_image_bytes_and_float_windows_exact(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    doc = json.loads(
        pa.write_input_data(
            _spec("img", TensorSpec("pixels__0", "UINT8", (8, 8, 3))), (pixels,), tmp_path / "i.json"
        ).read_text()
    )
    assert [s["pixels__0"]["shape"] for s in doc["data"]] == [[8, 8, 3]] * 3
    np.testing.assert_array_equal(_decoded(doc["data"][2]["pixels__0"], "uint8"), pixels[2])

    windows = rng.standard_normal((2, 16, 3)).astype(np.float32)
    doc = json.loads(
        pa.write_input_data(
            _spec("ts", TensorSpec("window__0", "FP32", (16, 3))), (windows,), tmp_path / "w.json"
        ).read_text()
    )
    np.testing.assert_array_equal(_decoded(doc["data"][1]["window__0"], "float32"), windows[1])


def test_input_data_refuses_a_batch_that_does_not_match_the_inputs(tmp_path):
    spec = _spec("text-x", TensorSpec("input_ids", "INT64", (-1,)), TensorSpec("attention_mask", "INT64", (-1,)))
    with pytest.raises(ValueError, match="2 inputs"):
        pa.write_input_data(spec, (np.zeros((2, 4), np.int64),), tmp_path / "x.json")


def test_command_line(tmp_path):
    cmd = pa.command(
        tmp_path / "perf_analyzer", "text-x", "127.0.0.1:8001", tmp_path / "in.json", tmp_path / "r.csv", 32, 2, False
    )
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == str(tmp_path / "perf_analyzer")
    assert args["-m"] == "text-x" and args["-u"] == "127.0.0.1:8001" and args["-i"] == "grpc"
    assert args["-b"] == "32" and args["--concurrency-range"] == "2"
    assert args["--input-data"] == str(tmp_path / "in.json") and cmd[-2:] == ["-f", str(tmp_path / "r.csv")]
    assert args["--shared-memory"] == "none"
    assert args["--measurement-interval"] == str(pa.MEASUREMENT_MS) and args["--max-trials"] == str(pa.MAX_TRIALS)
    assert "system" in pa.command(tmp_path / "p", "m", "u", tmp_path / "i", tmp_path / "c", 16, 2, True)


def test_parse_a_real_report():
    text = pa.parse_csv(TEXT_CSV)
    assert text["Inferences/Second"] == pytest.approx(242.814)
    assert text["p50 latency"] == 258425 and text["p99 latency"] == 320396
    assert pa.parse_csv(IMAGE_CSV)["Inferences/Second"] == pytest.approx(94.7753)
    assert pa.request_count(TEXT_STDOUT) == 82  # the client's, not the server's "Successful request count"


def test_parse_refuses_a_report_without_a_measurement():
    with pytest.raises(pa.PerfAnalyzerError, match="no measurement"):
        pa.parse_csv("Concurrency,Inferences/Second\n")


def test_stage_result_is_perf_analyzers_own_figures():
    res = pa.stage_result(pa.parse_csv(TEXT_CSV), 82, 32, 2, False)
    assert res.messages == 82 * 32
    assert res.throughput == pytest.approx(242.814)
    assert res.extra["p50_latency_ms"] == pytest.approx(258.425)
    assert res.extra["p99_latency_ms"] == pytest.approx(320.396)
    assert res.extra["batch"] == 32 and res.extra["concurrency"] == 2 and res.extra["shared_memory"] == "none"
    # No count in its output: one measurement window at its rate.
    res = pa.stage_result(pa.parse_csv(IMAGE_CSV), None, 32, 2, True)
    assert res.messages == round(94.7753 * pa.MEASUREMENT_MS / 1000) and res.throughput == pytest.approx(94.7753)


def test_shared_memory_as_the_worker_chooses_it():
    ts = load_settings(encoder={"family": "autoencoder", "arch": "w16c3h16l4", "weights": "random"})
    text = _spec("text-x", TensorSpec("input_ids", "INT64", (-1,)))
    fixed = _spec("ts", TensorSpec("window__0", "FP32", (16, 3)))
    assert pa.uses_shared_memory(ts, fixed)
    assert not pa.uses_shared_memory(ts, text)  # variable-size inputs go on the wire
    remote = ts.model_copy(update={"triton": ts.triton.model_copy(update={"url": "triton:8001"})})
    assert not pa.uses_shared_memory(remote, fixed)
    off = ts.model_copy(update={"triton": ts.triton.model_copy(update={"shared_memory": "off"})})
    assert not pa.uses_shared_memory(off, fixed)


def test_missing_binary_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pa.PerfAnalyzerError, match="embedstream\\[local\\]"):
        pa.find_binary()


def test_library_links_by_soname(tmp_path):
    wheel = tmp_path / "nvidia_pytriton.libs"
    wheel.mkdir()
    (wheel / "libb64-98cb6333.so.0d").write_bytes(b"")
    (wheel / "libcudart-09529672.so.12.6.77").write_bytes(b"")
    dirs = pa.library_dir(tmp_path / "work", wheel)
    assert dirs == [tmp_path / "work" / "perf-analyzer-libs", wheel]
    assert (dirs[0] / "libb64.so.0d").resolve() == wheel / "libb64-98cb6333.so.0d"
    assert (dirs[0] / "libcudart.so.12").resolve() == wheel / "libcudart-09529672.so.12.6.77"
    pa.library_dir(tmp_path / "work", wheel)  # again over its own links
    (wheel / "libb64-98cb6333.so.0d").unlink()
    with pytest.raises(pa.PerfAnalyzerError, match="libb64"):
        pa.library_dir(tmp_path / "work2", wheel)


def _fake_binary(tmp_path, monkeypatch, script: str) -> None:
    exe = tmp_path / "bin" / "perf_analyzer"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(pa, "find_binary", lambda: exe)
    monkeypatch.setattr(pa, "library_dir", lambda workdir: [workdir])


def _ts_run(tmp_path):
    settings = load_settings(
        encoder={"family": "autoencoder", "arch": "w16c3h16l4", "weights": "random"}, batch={"max_size": 16}
    )
    batch = (np.zeros((16, 16, 3), np.float32),)
    return pa.measure(settings, [batch], "127.0.0.1:8001", tmp_path / "work")


def test_measure_runs_the_binary_and_reads_its_report(tmp_path, monkeypatch):
    (tmp_path / "report.csv").write_text(TEXT_CSV)
    (tmp_path / "stdout.txt").write_text(TEXT_STDOUT)
    # Writes the captured report where -f says (the last argument) and prints the captured output.
    _fake_binary(
        tmp_path,
        monkeypatch,
        f'for a; do last="$a"; done\ncp {tmp_path}/report.csv "$last"\ncat {tmp_path}/stdout.txt\n',
    )
    res = _ts_run(tmp_path)
    assert res.messages == 82 * 16 and res.throughput == pytest.approx(242.814)
    assert res.extra["shared_memory"] == "system" and res.extra["batch"] == 16
    assert "-m ts-autoencoder-w16c3" in res.extra["command"] and "--shared-memory system" in res.extra["command"]
    data = json.loads((tmp_path / "work" / "perf-analyzer" / "ts-autoencoder-w16c3" / "input.json").read_text())
    assert len(data["data"]) == 16


def test_measure_raises_with_the_binarys_error(tmp_path, monkeypatch):
    _fake_binary(tmp_path, monkeypatch, 'echo "error: failed to get model metadata: unknown model" >&2\nexit 99\n')
    with pytest.raises(pa.PerfAnalyzerError, match=r"exited 99:\n.*unknown model"):
        _ts_run(tmp_path)
