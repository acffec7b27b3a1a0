"""The GPU run: bare torch and the served model through the real pipeline, images and text, one GPU.

Per modality (tf_efficientnet_lite0 images, all-MiniLM-L6-v2 text), at one GPU-sized batch:

- ``bare_eager_fp32`` / ``bare_eager_fp16``: the eager module on the device in this process, fp16 by
  autocast, on the worker's own preprocessed batches (decoded once, not timed), inputs copied in and
  embeddings copied back every batch, as a server must;
- ``bare_served``: the artifact Triton serves (TorchScript ``model.pt``, or ``model.onnx`` with ONNX
  Runtime's CUDA provider), loaded here the same way: what pipeline / bare is taken against;
- ``pipeline``: the local Tansu broker, the local Triton (nvidia-pytriton's server, the models as
  ``KIND_GPU`` instances of the Python backend) and N ``embedstream worker`` processes in one consumer
  group draining a backlog: N messages / (last output's timestamp - first member assigned).

GPU utilisation and memory are sampled during each stage (``nvidia-smi -lms 200``, else NVML). Both
encoders run with ``encoder.weights = "random"``: throughput does not depend on weight values, and
the weights rule allows random weights when they are named. ``report.json`` is rewritten after every
stage, so a run cut short still leaves what it measured. ``--device cpu`` runs the same on a CPU
(the local rehearsal of the hand-off).

A deployment script, not part of the installed package: ``deploy/gpu/run.sh`` runs it as
``python deploy/gpu/measure.py`` with ``workers/`` and the unpacked bundle on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from embedstream.config import EncoderSettings, Settings
    from embedstream.encoders import EncoderSpec
    from embedstream.export import ExportTarget
    from embedstream.local.stack.stack import LocalStack

WEIGHTS_NOTE = (
    "encoder.weights = 'random' for both encoders: throughput does not depend on weight values "
    "(embedstream's weights rule allows random weights when they are named)"
)
# The pretrained modalities (ModalityDefaults.pretrained), named here rather than read from the registry:
# the arguments are parsed before preflight has checked that embedstream imports, and each one's
# backlog comes from its own part of the bundle (photos, MiniLM's tokenizer).
MODALITIES = ("image", "text")
STAGES = ("bare_eager_fp32", "bare_eager_fp16", "bare_served", "pipeline")


@dataclass
class GpuOptions:
    device: str = "cuda"
    out: Path = Path("gpu-out")
    bundle: Path = Path(".embedstream/gpu-run")
    workdir: Path = Path("/tmp/embedstream-gpu")
    modalities: tuple[str, ...] = MODALITIES
    batch: int = 256
    workers: int = 8
    partitions: int = 0  # 0: as many as workers
    instances: int = 2
    counts: dict[str, int] = field(default_factory=lambda: {"image": 8192, "text": 65536})
    photo_pool: int = 512
    bare_batches: int = 8
    bare_seconds: float = 8.0
    artifact: str = "auto"
    timeout_s: float = 300.0
    preflight_only: bool = False
    # Another interpreter for the workers (the rehearsal runs them under numpy 2, as on the GPU image).
    worker_python: str = sys.executable

    @property
    def topic_partitions(self) -> int:
        return self.partitions or max(1, self.workers)


# ---------------------------------------------------------------------------------------- preflight


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = True


def _version(module: str) -> str:
    mod = importlib.import_module(module)
    return str(getattr(mod, "__version__", getattr(mod, "VERSION", "?")))


def _import_check(name: str, modules: Sequence[str]) -> Check:
    try:
        versions = [f"{m} {_version(m)}" for m in modules]
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}")
    return Check(name, True, ", ".join(versions))


def _unresolved(binary: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def triton_lib_env(bundle: Path) -> dict[str, str]:
    """LD_LIBRARY_PATH for the server and its stub: the bundle's libraries and this Python's libpython."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [str(bundle / "site" / "nvidia_pytriton.libs"), libdir, os.environ.get("LD_LIBRARY_PATH", "")]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in parts if p)}


def preflight(opts: GpuOptions) -> list[Check]:
    """What the run needs from the machine, each checked before anything starts."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    checks = [Check("python", True, f"{platform.python_version()} at {sys.executable}", fatal=False)]
    checks.append(_import_check("numpy/pyarrow/pillow", ["numpy", "pyarrow", "PIL"]))
    checks.append(_import_check("model side", ["torch", "timm", "transformers"]))
    checks.append(
        _import_check(
            "worker deps",
            ["kafka", "crc32c", "tritonclient.grpc", "pydantic", "pydantic_settings", "orjson", "tokenizers"],
        )
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tritonclient 2.51 imports the deprecated pkg_resources
            importlib.import_module("tritonclient.utils.shared_memory")
        importlib.import_module("embedstream.worker")
        importlib.import_module("embedstream.local.bench.stages")
        checks.append(Check("embedstream imports", True, "worker, bench stages"))
    except Exception as exc:
        checks.append(Check("embedstream imports", False, f"{type(exc).__name__}: {exc}"))
    checks.append(_device_check(opts.device))
    checks.append(_onnxruntime_check())
    smi = shutil.which("nvidia-smi")
    nvml = importlib.util.find_spec("pynvml") is not None
    checks.append(
        Check(
            "gpu sampler",
            bool(smi or nvml) or opts.device == "cpu",
            f"nvidia-smi {smi}" if smi else ("NVML (pynvml)" if nvml else "none: utilisation will not be reported"),
            fatal=False,
        )
    )
    root = opts.bundle / "site" / "pytriton" / "tritonserver"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    binaries = [root / "bin" / "tritonserver", root / "backends" / "python" / "libtriton_python.so", stub]
    missing_files = [str(b) for b in binaries if not b.is_file()]
    if missing_files:
        checks.append(Check("triton files", False, f"missing {', '.join(missing_files)} (bundle for another Python?)"))
    else:
        env = triton_lib_env(opts.bundle)
        unresolved = sorted({lib for b in binaries for lib in _unresolved(b, env)})
        checks.append(
            Check(
                "triton libraries",
                not unresolved,
                f"unresolved: {', '.join(unresolved)}" if unresolved else "tritonserver, python backend, stub resolve",
            )
        )
    broker = Path(os.environ.get("EMBEDSTREAM_BROKER_BIN", opts.bundle / "bin" / "tansu"))
    try:
        done = subprocess.run([str(broker), "--help"], capture_output=True, timeout=20, check=False)
        checks.append(Check("broker", done.returncode == 0, f"{broker} --help: exit {done.returncode}"))
    except OSError as exc:
        checks.append(Check("broker", False, f"{broker}: {exc}"))
    text_dir = opts.bundle / "models" / "all-MiniLM-L6-v2"
    checks.append(Check("text model files", (text_dir / "tokenizer.json").is_file(), str(text_dir)))
    photos = sorted((opts.bundle / "photos").glob("*.jpg"))
    checks.append(Check("photos", bool(photos), f"{len(photos)} in {opts.bundle / 'photos'}"))
    return checks


def _device_check(device: str) -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("device", False, str(exc))
    if device == "cpu":
        return Check("device", True, f"cpu ({os.cpu_count()} cores), torch {torch.__version__}")
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        return Check("device", False, f"torch {torch.__version__} sees no CUDA device (torch.version.cuda {cuda})")
    props = torch.cuda.get_device_properties(0)
    return Check(
        "device",
        True,
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}",
    )


def _onnxruntime_check() -> Check:
    try:
        import onnxruntime
    except ImportError:
        return Check("onnxruntime", True, "not installed: serving TorchScript", fatal=False)
    providers = onnxruntime.get_available_providers()
    return Check("onnxruntime", True, f"{onnxruntime.__version__}: {', '.join(providers)}", fatal=False)


def choose_artifact(requested: str, device: str) -> str:
    """``auto``: ONNX where ONNX Runtime has a provider for the device and the exporter's packages are
    here, else TorchScript (which the Python backend runs on CUDA through torch)."""
    if requested != "auto":
        return requested
    if device == "cpu":
        return "torchscript"
    try:
        import onnxruntime
    except ImportError:
        return "torchscript"
    exporter = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() or not exporter:
        return "torchscript"
    return "onnx" if onnx_cuda_works() else "torchscript"


PROBE_PROVIDER = "CUDAExecutionProvider"


def onnx_cuda_works() -> bool:
    """Whether a session really runs on ONNX Runtime's CUDA provider: it is listed even where its CUDA
    libraries are missing, and a session then falls back to the CPU with only a log line."""
    try:
        import numpy as np
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = min(model.ir_version, 9)
        onnx.checker.check_model(model)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=[PROBE_PROVIDER])
        session.run(None, {"x": np.ones((1, 4), dtype=np.float32)})
        return session.get_providers()[0] == PROBE_PROVIDER
    except Exception:
        return False


# ------------------------------------------------------------------------------------ GPU sampling


@dataclass(frozen=True)
class Sample:
    t: float  # epoch seconds
    util: float  # percent
    mem_mib: float


def parse_smi_csv(text: str) -> list[Sample]:
    """Rows of ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits``.

    The timestamp is the machine's local time (``2026/12/02 08:30:00.123``); rows that do not parse
    (a header, ``[N/A]``, a cut last line) are skipped.
    """
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append(Sample(t, float(parts[1].rstrip(" %")), float(parts[2].split()[0])))
        except ValueError:
            continue
    return samples


def summarise(samples: Sequence[Sample], start: float, end: float) -> dict[str, Any]:
    """Utilisation over one stage's window: mean / max percent, the most memory used, how many samples."""
    inside = [s for s in samples if start <= s.t <= end]
    if not inside:
        return {"samples": 0}
    utils = sorted(s.util for s in inside)
    return {
        "samples": len(inside),
        "util_mean": round(sum(utils) / len(utils), 1),
        "util_p50": utils[len(utils) // 2],
        "util_max": utils[-1],
        "mem_max_mib": max(s.mem_mib for s in inside),
    }


class GpuSampler:
    """Samples the GPU every 200 ms for the whole run; ``window`` gives one stage's summary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = "none"
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._nvml: list[Sample] = []

    def start(self) -> GpuSampler:
        smi = shutil.which("nvidia-smi")
        if smi:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.path.open("wb")
            query = "--query-gpu=timestamp,utilization.gpu,memory.used"
            argv = [smi, query, "--format=csv,noheader,nounits", "-i", "0", "-lms", "200"]
            self._proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.DEVNULL)
            self.source = "nvidia-smi"
        elif importlib.util.find_spec("pynvml") is not None:
            self._thread = threading.Thread(target=self._nvml_loop, name="gpu-sampler", daemon=True)
            self._thread.start()
            self.source = "nvml"
        return self

    def _nvml_loop(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.wait(0.2):
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            self._nvml.append(Sample(time.time(), float(rates.gpu), mem.used / 2**20))

    def samples(self) -> list[Sample]:
        if self.source == "nvidia-smi":
            self._log.flush()
            return parse_smi_csv(self.path.read_text(errors="replace"))
        return list(self._nvml)

    def window(self, start: float, end: float) -> dict[str, Any]:
        if self.source == "none":
            return {"samples": 0, "source": "none"}
        # nvidia-smi writes a sample up to 200 ms after it was taken.
        time.sleep(0.5)
        return {**summarise(self.samples(), start, end), "source": self.source}

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._log.close()


# ------------------------------------------------------------------------------------------ settings


def gpu_settings(modality: str, opts: GpuOptions) -> Settings:
    """The modality's pipeline at ``opts.batch``, random weights, the bundle's MiniLM directory for text."""
    from embedstream.config import load_settings
    from embedstream.local import pipelines

    b = opts.batch
    base = load_settings(
        encoder={"family": "cnn", "arch": "tf_efficientnet_lite0", "weights": "random", "max_batch_size": b},
        batch={"max_size": b},
    )
    if modality == "image":
        return base
    arch = str((opts.bundle / "models" / "all-MiniLM-L6-v2").resolve())
    return pipelines.with_modality(
        base,
        "text",
        {"family": "transformer", "arch": arch, "weights": "random", "max_batch_size": b},
        batch={"max_size": b},
    )


def messages_for(modality: str, settings: Settings, opts: GpuOptions) -> list[tuple[bytes, bytes]]:
    """The backlog: augmented copies of the bundled photos (a pool of ``photo_pool``, repeated), or the
    demo's sentences; keyed ``gpu-<n>``."""
    from embedstream.local.bench.pipeline import at_least
    from embedstream.local.bench.workload import rekey

    count = opts.counts[modality]
    if modality == "image":
        from embedstream.local.samples.photos import IMAGENET_LICENSE, Photo, photo_stream

        files = sorted((opts.bundle / "photos").glob("*.jpg"))
        photos = [Photo(f.stem, f, IMAGENET_LICENSE) for f in files]
        pool = [(m.key, m.value) for m in photo_stream(min(count, opts.photo_pool), photos=photos, prefix="pool")]
    else:
        from embedstream.local.samples.traffic import text_traffic

        pool = text_traffic(settings, count, bad_every=0).messages
    return rekey(at_least(pool, count), "gpu")


# ------------------------------------------------------------------------------------------- export


def device_exporter(device: str) -> Callable[[EncoderSettings, Path, ExportTarget | None], EncoderSpec]:
    """``export_model``, then the TorchScript file traced again on ``device``.

    A trace records the devices of tensors the module creates (transformers' mask code makes one on
    the example's device), so a file traced on the CPU can mix devices when run on CUDA. The weights
    are the same (seeded, or a file), so the fingerprint in the config still holds.
    """
    from embedstream.export import export_model

    def export(settings: EncoderSettings, repo: Path, target: ExportTarget | None = None) -> EncoderSpec:
        spec = export_model(settings, repo, target)
        if target is not None and target.artifact == "torchscript":
            retrace(settings, repo / spec.name / "1" / "model.pt", spec, device)
        return spec

    return export


def retrace(settings: EncoderSettings, path: Path, spec: EncoderSpec, device: str) -> None:
    import torch

    from embedstream.encoders import get_family
    from embedstream.export.model_repository import _trace

    family = get_family(settings.family)
    module = family.build(settings).to(device)
    example = tuple(t.to(device) for t in family.example_inputs(spec, 2))
    traced = _trace(module, example, spec)
    traced.save(str(path))
    del module, traced
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- stages


@dataclass
class Measured:
    rows: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "seconds": round(self.seconds, 4), "throughput": round(self.throughput, 2),
                **self.extra}  # fmt: skip


def _timed_loop(
    run_batch: Callable[[tuple[Any, ...]], None],
    batches: Sequence[tuple[Any, ...]],
    seconds: float,
    sync: Callable[[], None],
) -> Measured:
    """Passes over ``batches`` until ``seconds`` have gone by (at least one pass), after two warm-up calls."""
    for _ in range(2):
        run_batch(batches[0])
    sync()
    rows = 0
    passes = 0
    start = time.perf_counter()
    while True:
        for b in batches:
            run_batch(b)
            rows += int(b[0].shape[0])
        sync()
        passes += 1
        if time.perf_counter() - start >= seconds:
            break
    return Measured(rows, time.perf_counter() - start, {"passes": passes, "batches": len(batches)})


def bare_eager(
    settings: Settings, batches: Sequence[tuple[np.ndarray, ...]], device: str, precision: str, seconds: float
) -> Measured:
    """The eager module on ``device``; fp16 by autocast (bfloat16 on a CPU, which has no fp16 autocast)."""
    import torch

    from embedstream.encoders import get_family

    module = get_family(settings.encoder.family).build(settings.encoder).eval().to(device)
    host = [tuple(torch.from_numpy(a) for a in b) for b in batches]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    dtype = torch.float16 if kind == "cuda" else torch.bfloat16
    autocast = torch.autocast(device_type=kind, dtype=dtype) if precision == "fp16" else contextlib.nullcontext()

    def run(b: tuple[Any, ...]) -> None:
        with torch.inference_mode(), autocast:
            out = module(*(t.to(device, non_blocking=True) for t in b))
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().cpu()

    result = _timed_loop(run, host, seconds, _sync(device))
    result.extra.update(precision=precision if precision == "fp32" else str(dtype).removeprefix("torch."))
    _free(device)
    return result


def bare_served(
    model_dir: Path, spec: EncoderSpec, batches: Sequence[tuple[np.ndarray, ...]], device: str, seconds: float
) -> Measured:
    """The exported file Triton serves, loaded here on ``device``: TorchScript, or ONNX with CUDA's provider."""
    import numpy as np
    import torch

    version = model_dir / "1"
    if (version / "model.onnx").exists() and not (version / "model.pt").exists():
        import onnxruntime

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
        session = onnxruntime.InferenceSession(str(version / "model.onnx"), providers=providers)
        if device.startswith("cuda") and session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"ONNX Runtime fell back to {session.get_providers()}: no CUDA provider")
        names = [t.name for t in spec.inputs]

        def run_onnx(b: tuple[Any, ...]) -> None:
            session.run(None, {n: np.ascontiguousarray(a) for n, a in zip(names, b, strict=True)})

        result = _timed_loop(run_onnx, batches, seconds, lambda: None)
        result.extra["runtime"] = "onnxruntime"
        return result
    # As the served model.py does: the profiling executor re-specialises for every new input shape
    # (every sequence length of a text batch), which is not what Triton runs.
    set_optimize = getattr(torch._C, "_set_graph_executor_optimize", None)
    if set_optimize is not None:
        set_optimize(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; Triton serves it
        module = torch.jit.load(str(version / "model.pt"), map_location=device).eval()
    host = [tuple(torch.from_numpy(a) for a in b) for b in batches]

    def run(b: tuple[Any, ...]) -> None:
        with torch.inference_mode():
            out = module(*(t.to(device, non_blocking=True) for t in b))
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.cpu()

    result = _timed_loop(run, host, seconds, _sync(device))
    result.extra["runtime"] = "torchscript"
    _free(device)
    return result


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _free(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def pipeline_backlog(
    stack: LocalStack, settings: Settings, messages: list[tuple[bytes, bytes]], opts: GpuOptions, name: str
) -> Measured:
    """N workers in one group draining a backlog produced first (not timed)."""
    from embedstream.local.bench import stages
    from embedstream.local.readback import TopicReader
    from embedstream.local.stack.worker_process import WorkerProcess

    local = stack.local_settings(settings)
    k = local.kafka
    produced_at = time.time()
    stages.produce_burst(k, k.input_topic, messages, time.time)
    produce_s = time.time() - produced_at
    group = [
        WorkerProcess(local, stack.workdir, f"gpu-{name}-{i}", python=opts.worker_python) for i in range(opts.workers)
    ]
    follower = stages.Follower(TopicReader(k), group[0])
    try:
        for wp in group:
            wp.start()
        assigned: dict[str, float] = {}
        deadline = time.time() + 180
        while len(assigned) < len(group):
            for wp in group:
                if wp.name not in assigned and (wp.status() or {}).get("ready"):
                    assigned[wp.name] = time.time()
            stages.raise_if_exited(group)
            if time.time() > deadline:
                raise TimeoutError(f"{len(assigned)} of {len(group)} workers joined the group in 180 s")
            time.sleep(0.02)
        first = min(assigned.values())
        stages.wait_embedded(group, len(messages), opts.timeout_s, stages.no_progress, time.sleep)
        rows = follower.wait_for(b"gpu-", len(messages), opts.timeout_s, stages.no_progress)
        counters = [stages.worker_counters(wp) for wp in group]
    finally:
        follower.close()
        for wp in group:
            wp.terminate()
    embedded = sum(c[0] for c in counters)
    batches = sum(c[1] for c in counters)
    last = max(rows.values()) / 1000
    return Measured(
        len(rows),
        last - first,
        {
            "workers": len(group),
            "partitions": opts.topic_partitions,
            "embedded_by": [c[0] for c in counters],
            "mean_batch": round(embedded / batches, 1) if batches else 0.0,
            "joined_spread_s": round(max(assigned.values()) - first, 3),
            "produce_s": round(produce_s, 2),
            "started_at": first,
            "ended_at": last,
        },
    )


# -------------------------------------------------------------------------------------------- report


def ratios(stages_: dict[str, dict[str, Any]]) -> dict[str, float]:
    """pipeline / bare served (the target: >= 0.8 on a GPU), pipeline / eager fp32, fp16 / fp32."""

    def rate(name: str) -> float | None:
        got = stages_.get(name, {}).get("throughput")
        return float(got) if got else None

    out = {}
    for label, num, den in (
        ("pipeline/bare_served", "pipeline", "bare_served"),
        ("pipeline/bare_eager_fp32", "pipeline", "bare_eager_fp32"),
        ("pipeline/bare_eager_fp16", "pipeline", "bare_eager_fp16"),
        ("bare_fp16/bare_fp32", "bare_eager_fp16", "bare_eager_fp32"),
        ("bare_served/bare_fp32", "bare_served", "bare_eager_fp32"),
    ):
        a, b = rate(num), rate(den)
        if a is not None and b:
            out[label] = round(a / b, 3)
    return out


def load_report(path: Path) -> dict[str, Any]:
    report = json.loads(Path(path).read_text())
    if report.get("format") != 1 or "modalities" not in report:
        raise ValueError(f"{path} is not a GPU run report (format 1)")
    return report


def table_lines(report: dict[str, Any]) -> list[str]:
    """The report as a fixed-width table: one row per stage, one column per modality (rate, GPU util)."""
    mods = list(report["modalities"])
    units = {m: report["modalities"][m].get("unit", "msg/s") for m in mods}
    head = f"{'stage':<22}" + "".join(f"{m + ' (' + units[m] + ')':>34}" for m in mods)
    lines = [head, "-" * len(head)]
    for stage in STAGES:
        cells = []
        for m in mods:
            st = report["modalities"][m]["stages"].get(stage)
            if st is None or "throughput" not in st:
                cells.append(f"{'-' if st is None else 'failed':>34}")
                continue
            gpu = st.get("gpu", {})
            util = f"gpu {gpu['util_mean']:.0f}%/{gpu['util_max']:.0f}%" if gpu.get("samples") else "gpu n/a"
            cells.append(f"{st['throughput']:>14,.1f}  {util:>18}")
        lines.append(f"{stage:<22}" + "".join(cells))
    for label in ("pipeline/bare_served", "pipeline/bare_eager_fp32", "bare_fp16/bare_fp32"):
        cells = [f"{report['modalities'][m]['ratios'].get(label, float('nan')):>34.3f}" for m in mods]
        lines.append(f"{label:<22}" + "".join(cells))
    return lines


def _write(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- run


def run(opts: GpuOptions, checks: Sequence[Check]) -> dict[str, Any]:
    from embedstream import modalities
    from embedstream.export import ExportTarget
    from embedstream.export.triton_config import Artifact, Kind
    from embedstream.local.bench.workload import preprocessed_batches
    from embedstream.local.stack.stack import LocalStack
    from embedstream.service import encoder_spec

    artifact: Artifact = "onnx" if choose_artifact(opts.artifact, opts.device) == "onnx" else "torchscript"
    kind: Kind = "gpu" if opts.device.startswith("cuda") else "cpu"
    target = ExportTarget(kind=kind, instances=opts.instances, torch_threads=2, artifact=artifact)
    report: dict[str, Any] = {
        "format": 1,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "weights": WEIGHTS_NOTE,
        "checks": [c.__dict__ for c in checks],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "options": {
            "device": opts.device,
            "batch": opts.batch,
            "workers": opts.workers,
            "partitions": opts.topic_partitions,
            "instances": opts.instances,
            "kind": f"KIND_{kind.upper()}",
            "artifact": artifact,
            "counts": opts.counts,
            "bare_seconds": opts.bare_seconds,
            "worker_python": opts.worker_python,
        },
        "modalities": {},
    }
    sampler = GpuSampler(opts.out / "gpu-samples.csv").start()
    report["gpu_sampler"] = sampler.source
    settings = {m: gpu_settings(m, opts) for m in opts.modalities}
    try:
        print(f"starting the broker, exporting {', '.join(opts.modalities)} ({artifact}, KIND_{kind.upper()}), "
              "starting Triton...", flush=True)  # fmt: skip
        t0 = time.time()
        os.environ.setdefault("EMBEDSTREAM_BROKER_BIN", str(opts.bundle / "bin" / "tansu"))

        def start(t: ExportTarget) -> LocalStack:
            return LocalStack(
                list(settings.values()),
                workdir=opts.workdir,
                partitions=opts.topic_partitions,
                export_target=t,
                exporter=device_exporter(opts.device),
            ).start()

        try:
            stack = start(target)
        except Exception as exc:
            if artifact != "onnx" or opts.artifact != "auto":
                raise
            # ONNX was only chosen because it looked possible: the measurements matter more than the artifact.
            print(f"serving ONNX failed ({type(exc).__name__}: {exc}); serving TorchScript instead", flush=True)
            report["options"]["artifact"] = "torchscript"
            report["onnx_failed"] = f"{type(exc).__name__}: {exc}"[:2000]
            stack = start(dataclasses.replace(target, artifact="torchscript"))
        report["stack_start_s"] = round(time.time() - t0, 1)
        try:
            for m, s in settings.items():
                spec = encoder_spec(stack.local_settings(s))
                unit = f"{modalities.defaults(m).unit}/s"
                entry: dict[str, Any] = {"model": spec.name, "unit": unit, "stages": {}, "ratios": {}}
                report["modalities"][m] = entry
                messages = messages_for(m, s, opts)
                entry["messages"] = len(messages)
                entry["mean_message_bytes"] = round(sum(len(v) for _, v in messages) / len(messages), 1)
                batches = preprocessed_batches(s, messages[: opts.batch * opts.bare_batches])
                model_dir = stack.model_repository / spec.name
                stage_fns: list[tuple[str, Callable[[], Measured]]] = [
                    ("bare_eager_fp32", partial(bare_eager, s, batches, opts.device, "fp32", opts.bare_seconds)),
                    ("bare_eager_fp16", partial(bare_eager, s, batches, opts.device, "fp16", opts.bare_seconds)),
                    ("bare_served", partial(bare_served, model_dir, spec, batches, opts.device, opts.bare_seconds)),
                    ("pipeline", partial(pipeline_backlog, stack, s, messages, opts, m)),
                ]
                for name, fn in stage_fns:
                    _stage(entry, name, fn, sampler, report, opts)
                entry["ratios"] = ratios(entry["stages"])
                _write(report, opts.out)
        finally:
            stack.stop()
    finally:
        sampler.stop()
    report["seconds"] = round(time.time() - t0, 1)
    _write(report, opts.out)
    return report


def _stage(
    entry: dict[str, Any], name: str, fn: Callable[[], Measured], sampler: GpuSampler,
    report: dict[str, Any], opts: GpuOptions,
) -> None:  # fmt: skip
    print(f"  {entry['model']}: {name}...", flush=True)
    start = time.time()
    try:
        res = fn()
    except Exception as exc:  # one failed stage is reported; the others still run
        entry["stages"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"    FAILED: {type(exc).__name__}: {exc}", flush=True)
        _write(report, opts.out)
        return
    end = time.time()
    # the pipeline's own window is its timed one: first member assigned to last output
    w_start, w_end = res.extra.pop("started_at", start), res.extra.pop("ended_at", end)
    entry["stages"][name] = {**res.to_json(), "gpu": sampler.window(w_start, w_end)}
    print(f"    {res.throughput:,.1f} {entry['unit']} ({res.rows} in {res.seconds:.2f} s)", flush=True)
    _write(report, opts.out)


# ----------------------------------------------------------------------------------------------- cli


def parse_args(argv: Sequence[str] | None = None) -> GpuOptions:
    p = argparse.ArgumentParser(prog="python deploy/gpu/measure.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the GPU run) or cpu (the local rehearsal)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"))
    p.add_argument("--bundle", type=Path, default=Path(".embedstream/gpu-run"), help="the unpacked bundle")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/embedstream-gpu"))
    p.add_argument("--modalities", default="image,text")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--partitions", type=int, default=0, help="input/output partitions (default: --workers)")
    p.add_argument("--instances", type=int, default=2, help="Triton instances per model")
    p.add_argument("--image-count", type=int, default=8192)
    p.add_argument("--text-count", type=int, default=65536)
    p.add_argument("--photo-pool", type=int, default=512, help="distinct augmented photos, repeated to --image-count")
    p.add_argument("--bare-batches", type=int, default=8, help="distinct preprocessed batches the bare stages cycle")
    p.add_argument("--bare-seconds", type=float, default=8.0)
    p.add_argument("--artifact", choices=("auto", "torchscript", "onnx"), default="auto")
    p.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for a pipeline stage's rows")
    p.add_argument("--preflight-only", action="store_true")
    p.add_argument("--worker-python", default=sys.executable, help="interpreter for the worker processes")
    a = p.parse_args(argv)
    mods = tuple(m.strip() for m in a.modalities.split(",") if m.strip())
    if not mods or set(mods) - set(MODALITIES):
        p.error(f"--modalities takes a subset of {','.join(MODALITIES)}")
    opts = GpuOptions(
        device=a.device, out=a.out, bundle=a.bundle, workdir=a.workdir, modalities=mods, batch=a.batch,
        workers=a.workers, partitions=a.partitions, instances=a.instances,
        counts={"image": a.image_count, "text": a.text_count}, photo_pool=a.photo_pool,
        bare_batches=a.bare_batches, bare_seconds=a.bare_seconds, artifact=a.artifact, timeout_s=a.timeout_s,
        preflight_only=a.preflight_only, worker_python=a.worker_python,
    )  # fmt: skip
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    checks = preflight(opts)
    print("preflight:")
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
        print(f"  [{mark}] {c.name:<22} {c.detail}")
    failed = [c for c in checks if c.fatal and not c.ok]
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "preflight.json").write_text(json.dumps([c.__dict__ for c in checks], indent=2))
    if failed:
        print(f"preflight failed: {', '.join(c.name for c in failed)}; nothing was started", file=sys.stderr)
        return 3
    if opts.preflight_only:
        return 0
    report = run(opts, checks)
    print()
    for line in table_lines(report):
        print(line)
    print(f"\n{WEIGHTS_NOTE}\nreport: {opts.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
