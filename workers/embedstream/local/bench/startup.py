"""Worker start-up and memory: process start -> ``/readyz`` ready (joined its group), and RSS then.

One embedded stack serves a text, an image and a time-series encoder. Each run starts one worker
process per modality and code variant with a fresh consumer group, polls ``/readyz`` every 20 ms,
reads the worker's VmRSS / VmHWM once it is ready and whether libtorch is mapped into it, then stops
it. Variants are interleaved run by run, so background load hits them alike. A variant is
``label=PYTHONPATH[,PYTHON]``: another code tree (e.g. an older checkout's ``workers/``) and
optionally another interpreter (e.g. a venv with the core dependencies only).

  python -m embedstream.local.bench.startup --runs 3 --variant before=/tmp/before/workers
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from embedstream.config import Settings, load_settings
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.worker_process import WorkerProcess

PIPELINES = {
    "text": {"encoder": {"family": "transformer", "arch": "all-MiniLM-L6-v2"}},
    # The default image encoder with its packaged ImageNet weights, as `embedstream up` serves it.
    "image": {"encoder": {"family": "cnn", "arch": "tf_efficientnet_lite0"}},
    "timeseries": {"encoder": {"family": "autoencoder", "arch": "w32c3h16l8", "weights": "random"}},
}


@dataclass(frozen=True)
class Variant:
    label: str
    pythonpath: str | None = None
    python: str | None = None

    @classmethod
    def parse(cls, raw: str) -> Variant:
        label, _, rest = raw.partition("=")
        path, _, python = rest.partition(",")
        return cls(label, path or None, python or None)


@dataclass(frozen=True)
class Sample:
    ready_s: float
    rss_mib: int
    peak_mib: int
    torch_loaded: bool


def _memory_mib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def _torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _wait_ready(worker: WorkerProcess, started: float, timeout_s: float = 180.0) -> float:
    while not (worker.status() or {}).get("ready"):
        if not worker.alive() or time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{worker.name} did not get ready:\n{worker.tail()}")
        time.sleep(0.02)
    return time.monotonic() - started


def measure(settings: Settings, variant: Variant, workdir: Path, name: str) -> Sample:
    group = f"startup-{name}-{time.time_ns()}"
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"group_id": group})})
    extra = {"python": variant.python} if variant.python else {}
    worker = WorkerProcess(settings, workdir, name, pythonpath=variant.pythonpath, **extra)
    started = time.monotonic()
    worker.start()
    try:
        ready_s = _wait_ready(worker, started)
        pid = worker.pid
        if pid is None:
            raise RuntimeError(f"{worker.name} has no process")
        rss, peak = _memory_mib(pid)
        return Sample(round(ready_s, 2), rss, peak, _torch_mapped(pid))
    finally:
        worker.terminate()


def _report(results: dict[tuple[str, str], list[Sample]], runs: int) -> None:
    print(f"\nmedian of {runs} runs")
    print(f"{'modality':<11}{'variant':<17}{'ready s':>8}{'RSS MiB':>9}{'peak MiB':>9}  torch loaded")
    for (modality, label), samples in results.items():
        print(
            f"{modality:<11}{label:<17}{statistics.median(s.ready_s for s in samples):>8.2f}"
            f"{statistics.median(s.rss_mib for s in samples):>9.0f}"
            f"{statistics.median(s.peak_mib for s in samples):>9.0f}  {sorted({s.torch_loaded for s in samples})}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modalities", default=",".join(PIPELINES))
    parser.add_argument("--variant", action="append", default=[], help="label=PYTHONPATH[,PYTHON]; repeatable")
    args = parser.parse_args(argv)
    variants = [Variant("this tree"), *(Variant.parse(v) for v in args.variant)]
    bases = {m: load_settings(None, **PIPELINES[m]) for m in args.modalities.split(",")}
    workdir = Path(tempfile.mkdtemp(prefix="startup-"))
    results: dict[tuple[str, str], list[Sample]] = {(m, v.label): [] for m in bases for v in variants}
    with LocalStack(list(bases.values()), workdir=workdir, partitions=2) as stack:
        for i in range(args.runs):
            for modality, base in bases.items():
                for n, v in enumerate(variants):
                    sample = measure(stack.local_settings(base), v, workdir, f"{modality}-v{n}-{i}")
                    results[(modality, v.label)].append(sample)
                    print(modality, v.label, i, sample, flush=True)
    _report(results, args.runs)


if __name__ == "__main__":
    main()
