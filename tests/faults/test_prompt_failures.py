"""Failures are reported at once and cleaned up for good, on the real stack.

- A crashed Triton (its server process SIGKILLed alone, as the OOM killer does) takes its
  Python-backend stubs with it within seconds, and the worker's /readyz says degraded within
  seconds, long before its batches run out of retries.
- A frozen Triton (SIGSTOP) shows as degraded once a readiness probe has waited its timeout.
- A worker stopped with SIGTERM mid-stream logs no error and no traceback.
- Stale stubs of an earlier run under the same work directory (which ignore SIGTERM) are killed
  when the local Triton starts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedstream.local.samples.generated import samples
from embedstream.local.stack.process import is_zombie
from embedstream.local.stack.triton import LocalTriton
from embedstream.local.stack.worker_process import WorkerProcess

from ..integration.helpers import produce, wait_for_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The worker's probe runs every 0.5 s and counts 2 s unanswered as down (the defaults).
DEGRADED_WITHIN_S = 3.0
STUBS_GONE_WITHIN_S = 3.0
ERROR_LINE = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b")


def _until(cond, timeout_s: float, tick: float = 0.05) -> float | None:
    """Seconds until ``cond()`` held, or None if it did not within ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if cond():
            return time.monotonic() - started
        time.sleep(tick)
    return None


def _degraded(worker: WorkerProcess) -> bool:
    return (worker.status() or {}).get("degraded") is True


def _error_lines(log_path: Path) -> list[str]:
    return [line for line in log_path.read_text(errors="replace").splitlines() if ERROR_LINE.search(line)]


def test_triton_crash_takes_its_stubs_along_and_readyz_says_degraded_at_once(fault_lane, fault_stack):
    settings, workdir = fault_lane
    triton = fault_stack.triton
    assert triton.stubs(), "the served model runs in Python-backend stubs"
    batch = list(samples(200, prefix="crash"))
    produce(settings.kafka.bootstrap_servers, settings.kafka.input_topic, [(s.key, s.value) for s in batch])
    worker = WorkerProcess(settings, workdir, "w-crash").start()
    try:
        assert wait_for_rows(settings, 20) >= 20, worker.tail()
        os.kill(triton.pid, signal.SIGKILL)  # the server alone, not its group: a crash, mid-stream
        gone = _until(lambda: not triton.stubs(), STUBS_GONE_WITHIN_S)
        degraded = _until(lambda: _degraded(worker), DEGRADED_WITHIN_S)
        print(f"after the Triton crash: stubs gone in {gone}s, /readyz degraded in {degraded}s")
        assert gone is not None, f"stubs outlived the server: {triton.stubs()}"
        assert degraded is not None, worker.status()
        status = worker.status() or {}
        assert status["ready"] is False and status["degraded_reason"], status
        # SIGTERM while Triton is away and batches are held: a clean stop, not an error.
        worker.terminate()
        assert _error_lines(worker.log_path) == [], worker.tail()
    finally:
        worker.terminate()
        triton.start()


def test_triton_frozen_is_degraded_once_a_probe_times_out(fault_lane, fault_stack):
    settings, workdir = fault_lane
    pid = fault_stack.triton.pid
    worker = WorkerProcess(settings, workdir, "w-freeze").start().wait_ready()
    try:
        os.kill(pid, signal.SIGSTOP)
        degraded = _until(lambda: _degraded(worker), DEGRADED_WITHIN_S + 1)
        print(f"after SIGSTOP of Triton: /readyz degraded in {degraded}s")
        assert degraded is not None, worker.status()
        assert "unanswered" in (worker.status() or {}).get("degraded_reason", ""), worker.status()
        os.kill(pid, signal.SIGCONT)
        assert _until(lambda: (worker.status() or {}).get("ready") is True, 20) is not None, worker.status()
    finally:
        os.kill(pid, signal.SIGCONT)
        worker.terminate()


def test_sigterm_mid_stream_logs_no_error_or_traceback(fault_lane):
    settings, workdir = fault_lane
    batch = list(samples(200, prefix="quiet"))
    produce(settings.kafka.bootstrap_servers, settings.kafka.input_topic, [(s.key, s.value) for s in batch])
    worker = WorkerProcess(settings, workdir, "w-term").start()
    try:
        assert wait_for_rows(settings, 20) >= 20, worker.tail()
    finally:
        worker.terminate()  # SIGTERM, then waits for the exit
    text = worker.log_path.read_text(errors="replace")
    assert "received SIGTERM" in text, text[-2000:]
    assert _error_lines(worker.log_path) == [], text[-4000:]


def test_stale_stubs_of_an_earlier_run_are_killed_at_start(tmp_path):
    """A stand-in stub (its argv[0] the work directory's stub path) that ignores SIGTERM, like the real one."""
    pytest.importorskip("pytriton")
    backends = tmp_path / "triton-backends" / "python"
    backends.mkdir(parents=True)
    stub_path = backends / "triton_python_backend_stub"
    ignore_term = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    )
    stale = subprocess.Popen([str(stub_path), "-c", ignore_term], executable=sys.executable, stdout=subprocess.PIPE)
    other = subprocess.Popen(
        [str(tmp_path / "elsewhere" / "triton_python_backend_stub"), "-c", ignore_term],
        executable=sys.executable,
        stdout=subprocess.PIPE,
    )
    try:
        assert stale.stdout is not None and stale.stdout.readline() == b"up\n"
        assert other.stdout is not None and other.stdout.readline() == b"up\n"
        os.kill(stale.pid, signal.SIGTERM)
        time.sleep(0.2)
        assert stale.poll() is None, "the stand-in ignores SIGTERM"
        triton = LocalTriton(tmp_path, tmp_path / "models")  # not started: construction reaps
        assert stale.wait(timeout=5) == -signal.SIGKILL
        assert triton.stubs() == []
        assert other.poll() is None and not is_zombie(other.pid), "a stub of another work directory is left alone"
    finally:
        for proc in (stale, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
