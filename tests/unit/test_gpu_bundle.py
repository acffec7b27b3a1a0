"""The GPU run's packaging and report, without a GPU: the size budget, what a bundle unpacks to and
installs, the ldd and nvidia-smi parsing, the ratios and the printed table.

The whole hand-off (pack, copy the tree as the device does, unpack, run on the CPU) is rehearsed by
``deploy/gpu/rehearse.sh`` (about 2 minutes, docs/gpu.md), not here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

GPU_SCRIPTS = Path(__file__).resolve().parents[2] / "deploy" / "gpu"


def _script(name: str) -> ModuleType:
    """A deploy/gpu script as a module: they run by path on the device and are no installed package."""
    spec = importlib.util.spec_from_file_location(f"deploy_gpu_{name}", GPU_SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu = _script("measure")
gpu_bundle = _script("bundle")
MIB = gpu_bundle.MIB
BundleError = gpu_bundle.BundleError


def test_budget_fits_only_with_room_left_for_the_tree() -> None:
    assert gpu_bundle.budget(44 * MIB, 2 * MIB)["fits"]
    tight = gpu_bundle.budget(60 * MIB, 2 * MIB)
    assert tight["headroom_bytes"] == 2 * MIB
    assert not tight["fits"]  # under 64 MiB, but without the margin the tree may grow into
    assert not gpu_bundle.budget(63 * MIB, 2 * MIB)["fits"]


def test_tree_bytes_counts_what_the_device_copies(tmp_path: Path) -> None:
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(".gpu-bundle/\n")
    (tmp_path / "code.py").write_bytes(b"x" * 1000)
    (tmp_path / ".gpu-bundle").mkdir()
    (tmp_path / ".gpu-bundle" / "bundle.tar.xz").write_bytes(b"y" * 50_000)
    assert gpu_bundle.tree_bytes(tmp_path) == 1000 + len(".gpu-bundle/\n")


def test_parse_ldd_keeps_only_the_wheels_libraries() -> None:
    text = """
\tlinux-vdso.so.1 (0x00007fff)
\tlibcudart-09529672.so.12.6.77 => /x/site-packages/nvidia_pytriton.libs/libcudart-09529672.so.12.6.77 (0x1)
\tlibpython3.12.so.1.0 => not found
\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x2)
\tlibdcgm-7f88035e.so.3.2.6 => /x/bin/../../../nvidia_pytriton.libs/libdcgm-7f88035e.so.3.2.6 (0x3)
"""
    assert gpu_bundle.parse_ldd(text, "nvidia_pytriton.libs") == {
        "libcudart-09529672.so.12.6.77",
        "libdcgm-7f88035e.so.3.2.6",
    }


def _wheel(path: Path, files: dict[str, bytes], executable: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name in executable else 0o644) << 16
            z.writestr(info, data)
    return path


def test_unpack_wheel_lays_out_like_pip_target_and_drops_perf_analyzer(tmp_path: Path) -> None:
    wheel = _wheel(
        tmp_path / "tritonclient-2.51.0-py3-none-manylinux1_x86_64.whl",
        {
            "tritonclient-2.51.0.data/purelib/tritonclient/__init__.py": b"",
            "tritonclient-2.51.0.data/purelib/tritonclient/utils/libcshm.so": b"\x7fELF",
            "tritonclient-2.51.0.data/data/bin/perf_analyzer": b"\x7fELF" * 1000,
            "tritonclient-2.51.0.dist-info/METADATA": b"Name: tritonclient\n",
            "tool/run": b"#!/bin/sh\n",
        },
        executable=("tool/run",),
    )
    dest = tmp_path / "out"
    written = gpu_bundle.unpack_wheel(wheel, dest)
    assert (dest / "tritonclient" / "utils" / "libcshm.so").is_file()
    assert (dest / "tritonclient-2.51.0.dist-info" / "METADATA").is_file()
    assert not list(dest.rglob("perf_analyzer"))
    assert (dest / "tool" / "run").stat().st_mode & 0o100
    assert written == 4 + len(b"Name: tritonclient\n") + len(b"#!/bin/sh\n")
    assert gpu_bundle.dist_of(wheel) == "tritonclient"
    assert gpu_bundle.dist_of(Path("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl")) == "pydantic-core"


def test_every_group_installs_wheels_the_packer_downloads() -> None:
    dists = {d for g in gpu_bundle.GROUPS for d in g.dists}
    assert dists == set(gpu_bundle.WHEELS)


def _fake_bundle(tmp_path: Path) -> Path:
    """A bundle with one wheel group whose module the running Python cannot import."""
    stage = tmp_path / "stage"
    pkg = stage / "wheels" / "fakepkg" / "embedstream_fake_dep"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 42\n")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    archive = bundle / gpu_bundle.ARCHIVE
    gpu_bundle._write_archive(stage, archive, 1)
    manifest = {"format": 1, "python": "3.x", "archive": {"name": gpu_bundle.ARCHIVE, "sha256": ""}}
    manifest["archive"]["sha256"] = gpu_bundle.file_sha256(archive)
    (bundle / gpu_bundle.MANIFEST).write_text(json.dumps(manifest))
    return bundle


def test_unpack_checks_the_archive_and_reuses_a_warm_copy(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    dest = tmp_path / "run"
    assert gpu_bundle.unpack(bundle, dest)["reused"] is False
    assert (dest / "wheels" / "fakepkg" / "embedstream_fake_dep" / "__init__.py").is_file()
    assert gpu_bundle.unpack(bundle, dest)["reused"] is True
    (bundle / gpu_bundle.ARCHIVE).write_bytes(b"not the archive")
    with pytest.raises(BundleError, match="sha256"):
        gpu_bundle.unpack(bundle, dest)


def test_install_copies_a_group_only_where_its_import_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _fake_bundle(tmp_path)
    dest = tmp_path / "run"
    gpu_bundle.unpack(bundle, dest)
    groups = (
        gpu_bundle.Group("present", "import json", ("missing-dist",)),
        gpu_bundle.Group("fake", "import embedstream_fake_dep; assert embedstream_fake_dep.VALUE == 42", ("fakepkg",)),
    )
    monkeypatch.setattr(gpu_bundle, "GROUPS", groups)
    report = gpu_bundle.install(dest, sys.executable)
    assert report[0] == {"group": "present", "status": "image"}
    assert report[1]["status"] == "installed"
    assert "No module named 'embedstream_fake_dep'" in report[1]["image_error"]
    assert (dest / "site" / "embedstream_fake_dep" / "__init__.py").is_file()
    # forcing installs every group, and a group whose wheel is not in the bundle is an error
    with pytest.raises(BundleError, match="no wheel missing-dist"):
        gpu_bundle.install(dest, sys.executable, force=True)


SMI = """2026/12/02 10:00:00.000, 0, 1024
2026/12/02 10:00:00.200, 80, 4096
2026/12/02 10:00:00.400, 100, 6000
2026/12/02 10:00:00.600, [N/A], 6000
2026/12/02 10:00:00.800, 40, 5000
2026/12/02 10:00:01."""


def test_nvidia_smi_samples_are_summarised_per_stage_window() -> None:
    samples = gpu.parse_smi_csv(SMI)
    assert [s.util for s in samples] == [0, 80, 100, 40]  # the N/A row and the cut last line are skipped
    start, end = samples[1].t, samples[3].t
    assert gpu.summarise(samples, start, end) == {
        "samples": 3,
        "util_mean": 73.3,
        "util_p50": 80,
        "util_max": 100,
        "mem_max_mib": 6000,
    }
    assert gpu.summarise(samples, end + 10, end + 20) == {"samples": 0}


def _report() -> dict:
    stages = {
        "bare_eager_fp32": {"throughput": 10000.0, "gpu": {"samples": 40, "util_mean": 91.0, "util_max": 99.0}},
        "bare_eager_fp16": {"throughput": 20000.0, "gpu": {"samples": 40, "util_mean": 85.0, "util_max": 97.0}},
        "bare_served": {"throughput": 8000.0, "gpu": {"samples": 40, "util_mean": 80.0, "util_max": 95.0}},
        "pipeline": {"throughput": 2000.0, "gpu": {"samples": 0}},
    }
    text = {"bare_eager_fp32": {"throughput": 30000.0, "gpu": {}}, "pipeline": {"error": "TimeoutError: ..."}}
    return {
        "format": 1,
        "modalities": {
            "image": {"unit": "images/s", "stages": stages, "ratios": gpu.ratios(stages)},
            "text": {"unit": "sentences/s", "stages": text, "ratios": gpu.ratios(text)},
        },
    }


def test_ratios_take_pipeline_against_the_served_runtime_and_skip_what_did_not_run() -> None:
    report = _report()
    assert report["modalities"]["image"]["ratios"] == {
        "pipeline/bare_served": 0.25,
        "pipeline/bare_eager_fp32": 0.2,
        "pipeline/bare_eager_fp16": 0.1,
        "bare_fp16/bare_fp32": 2.0,
        "bare_served/bare_fp32": 0.8,
    }
    assert report["modalities"]["text"]["ratios"] == {}  # its pipeline failed: no ratio rather than a wrong one


def test_report_reads_back_and_prints_a_row_per_stage(tmp_path: Path) -> None:
    path = gpu._write(_report(), tmp_path)
    lines = gpu.table_lines(gpu.load_report(path))
    assert "image (images/s)" in lines[0] and "text (sentences/s)" in lines[0]
    by_stage = {line.split()[0]: line for line in lines[2:]}
    assert "20,000.0" in by_stage["bare_eager_fp16"] and "gpu 85%/97%" in by_stage["bare_eager_fp16"]
    assert "gpu n/a" in by_stage["pipeline"]  # no samples in the window
    assert "failed" in by_stage["pipeline"]  # text's stage error shows, not a number
    assert "0.250" in by_stage["pipeline/bare_served"]
    (tmp_path / "other.json").write_text('{"stages": {}}')
    with pytest.raises(ValueError, match="not a GPU run report"):
        gpu.load_report(tmp_path / "other.json")


def test_auto_artifact_is_torchscript_without_a_cuda_provider() -> None:
    assert gpu.choose_artifact("auto", "cpu") == "torchscript"
    assert gpu.choose_artifact("onnx", "cuda") == "onnx"


def test_preflight_fails_clearly_on_an_empty_bundle(tmp_path: Path) -> None:
    opts = gpu.GpuOptions(device="cpu", bundle=tmp_path, out=tmp_path / "out")
    checks = {c.name: c for c in gpu.preflight(opts)}
    assert not checks["triton files"].ok and "missing" in checks["triton files"].detail
    assert not checks["broker"].ok
    assert not checks["photos"].ok
    assert gpu.main(["--device", "cpu", "--bundle", str(tmp_path), "--out", str(tmp_path / "out")]) == 3
    assert (tmp_path / "out" / "preflight.json").is_file()


def test_the_onnx_provider_probe_builds_a_model_onnx_runtime_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setattr(gpu, "PROBE_PROVIDER", "CPUExecutionProvider")
    assert gpu.onnx_cuda_works()
