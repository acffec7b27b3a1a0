"""NVIDIA's ``perf_analyzer`` against the bench's own Triton: the server's reference throughput per model.

The ``triton`` stage measures the served model through the worker's Python client; this one puts
Triton's C++ load generator on the same model, the same batch, the same requests in flight and the
same input bytes, so the gap between the two is what our client costs.

The binary comes from the ``tritonclient`` wheel of the embedded server's release (pinned in the
``local`` extra), which pip installs next to this environment's Python.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson

from embedstream.config import Settings
from embedstream.encoders import EncoderSpec
from embedstream.inference.triton import NUMPY_DTYPE, shared_memory_bytes
from embedstream.local.bench.report import StageResult
from embedstream.service import encoder_spec

BINARY = "perf_analyzer"
# Bounded, not converged: a reference figure within a minute per model on a shared 2-core box,
# where perf_analyzer's default (5 s windows until three agree within 10%) can run for minutes.
MEASUREMENT_MS = 3000
MAX_TRIALS = 6
STABILITY_PCT = 50
TIMEOUT_S = 180.0
# The sonames the binary was linked against; nvidia-pytriton's wheel carries both under
# auditwheel's hashed names, which the loader will not find by soname on its own.
_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, could not start, or did not produce a measurement."""


def find_binary() -> Path:
    """The binary next to this interpreter (this venv's tritonclient), else the first on PATH."""
    here = Path(sys.executable).parent / BINARY
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise PerfAnalyzerError(
        f"no {BINARY} next to {sys.executable} or on PATH: install 'embedstream[local]' "
        "(its tritonclient==2.51.0 wheel carries the binary)"
    )


def library_dir(workdir: Path, wheel_libs: Path | None = None) -> list[Path]:
    """LD_LIBRARY_PATH entries that satisfy the binary: soname links under ``workdir``, then the wheel's libs."""
    if wheel_libs is None:
        import pytriton  # the server's wheel: runtime.triton has already required it to start Triton

        wheel_libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    links = workdir / "perf-analyzer-libs"
    links.mkdir(parents=True, exist_ok=True)
    for soname, pattern in _LIBS.items():
        found = sorted(wheel_libs.glob(pattern))
        if not found:
            raise PerfAnalyzerError(f"{BINARY} needs {soname}: no {pattern} under {wheel_libs} (nvidia-pytriton)")
        link = links / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[-1])
    return [links, wheel_libs]


def write_input_data(spec: EncoderSpec, batch: Sequence[np.ndarray], path: Path) -> Path:
    """The batch as perf_analyzer's ``--input-data`` JSON: one step per row, in the model's own dtype.

    perf_analyzer builds a request of ``-b N`` from N consecutive steps and refuses steps of
    different shapes in one request; each row is given its shape (no batch dim), so text, padded to
    its batch's longest message, works as long as every step comes from one batch. Real rows rather
    than perf_analyzer's random data: random token ids can fall outside the embedding table.
    """
    if len(batch) != len(spec.inputs):
        raise ValueError(f"{spec.name} has {len(spec.inputs)} inputs, the batch {len(batch)} arrays")
    steps = []
    for i in range(batch[0].shape[0]):
        step: dict[str, dict[str, object]] = {}
        for t, arr in zip(spec.inputs, batch, strict=True):
            row = np.ascontiguousarray(arr[i], dtype=NUMPY_DTYPE[t.dtype])
            # Base64 of the raw bytes: exact floats, and far smaller than a JSON list of numbers.
            step[t.name] = {"content": {"b64": base64.b64encode(row.tobytes()).decode()}, "shape": list(row.shape)}
        steps.append(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"data": steps}))
    return path


def command(
    binary: Path,
    model: str,
    grpc_url: str,
    input_data: Path,
    csv_path: Path,
    batch: int,
    concurrency: int,
    shared_memory: bool,
) -> list[str]:
    return [
        str(binary),
        "-m",
        model,
        "-u",
        grpc_url,
        "-i",
        "grpc",
        "-b",
        str(batch),
        "--concurrency-range",
        str(concurrency),
        "--input-data",
        str(input_data),
        "--shared-memory",
        "system" if shared_memory else "none",
        "--measurement-interval",
        str(MEASUREMENT_MS),
        "--max-trials",
        str(MAX_TRIALS),
        "--stability-percentage",
        str(STABILITY_PCT),
        "--verbose-csv",
        "-f",
        str(csv_path),
    ]


def parse_csv(text: str) -> dict[str, float]:
    """perf_analyzer's ``-f`` report: one row per concurrency; the last one is what was asked for."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "Inferences/Second" not in rows[-1]:
        raise PerfAnalyzerError(f"{BINARY} wrote no measurement row:\n{text[-2000:]}")
    return {k.strip(): float(v) for k, v in rows[-1].items() if k and v not in (None, "")}


def request_count(stdout: str) -> int | None:
    """The client's ``Request count`` over the reported windows (the CSV has rates only)."""
    found = _REQUEST_COUNT.findall(stdout)
    return int(found[-1]) if found else None


_REQUEST_COUNT = re.compile(r"^\s*Request count:\s*(\d+)\s*$", re.MULTILINE)


def stage_result(row: dict[str, float], requests: int | None, batch: int, concurrency: int, shm: bool) -> StageResult:
    """Rows/s is perf_analyzer's ``Inferences/Second`` (batch x requests); its latencies are µs per request.

    Messages are the rows its requests carried and seconds what that takes at its rate, so the
    stage's throughput is perf_analyzer's own figure; without a count, one window's worth.
    """
    throughput = row["Inferences/Second"]
    messages = requests * batch if requests else round(throughput * MEASUREMENT_MS / 1000.0)
    extra = {
        "inferences_per_second": throughput,
        "requests": requests,
        "p50_latency_ms": row.get("p50 latency", 0.0) / 1000.0,
        "p99_latency_ms": row.get("p99 latency", 0.0) / 1000.0,
        "batch": batch,
        "concurrency": concurrency,
        "shared_memory": "system" if shm else "none",
    }
    return StageResult(messages, messages / throughput if throughput > 0 else 0.0, extra)


def uses_shared_memory(settings: Settings, spec: EncoderSpec) -> bool:
    """The worker's own choice (``inference.triton.shared_memory_bytes``).

    perf_analyzer's system shared memory works for text too, but the worker sends variable-size
    inputs on the wire, and the point here is the same requests as the ``triton`` stage.
    """
    return shared_memory_bytes(settings.triton, spec) is not None


def measure(settings: Settings, batches: Sequence[Sequence[np.ndarray]], grpc_url: str, workdir: Path) -> StageResult:
    """perf_analyzer on the served model at ``batch.max_size`` x ``batch.max_in_flight``, fed the first batch."""
    spec = encoder_spec(settings)
    if not batches:
        raise PerfAnalyzerError(f"no preprocessed batch to feed {BINARY} for {spec.name}")
    batch, concurrency = settings.batch.max_size, settings.batch.max_in_flight
    shm = uses_shared_memory(settings, spec)
    binary = find_binary()
    out = workdir / "perf-analyzer" / spec.name
    csv_path = out / "report.csv"
    csv_path.unlink(missing_ok=True)
    data = write_input_data(spec, batches[0], out / "input.json")
    cmd = command(binary, spec.name, grpc_url, data, csv_path, batch, concurrency, shm)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [*(str(p) for p in library_dir(workdir)), *filter(None, [env.get("LD_LIBRARY_PATH")])]
    )
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PerfAnalyzerError(f"{BINARY} on {spec.name} ran past {TIMEOUT_S:.0f} s:\n{_tail(exc.stdout)}") from exc
    (out / "output.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not csv_path.is_file():
        raise PerfAnalyzerError(
            f"{BINARY} on {spec.name} exited {done.returncode}:\n{_tail(done.stdout + done.stderr)}\n"
            f"command: {shlex.join(cmd)}"
        )
    res = stage_result(parse_csv(csv_path.read_text()), request_count(done.stdout), batch, concurrency, shm)
    res.extra["command"] = shlex.join(cmd)
    return res


def _tail(text: str | bytes | None, lines: int = 30) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])
