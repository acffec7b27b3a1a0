"""A cache of exported models, for the embedded stack: an unchanged encoder is not exported twice.

Exporting EfficientNet-Lite0 to ONNX and checking it against eager takes ~15 s on two cores; the
demo, ``up``, the bench and the test stacks export the same encoders again and again. With
``EMBEDSTREAM_EXPORT_CACHE`` set to a directory, ``LocalStack`` looks an export up there first and
copies it into its model repository. The key covers everything that makes the export: the encoder
settings, the target, the content of the files they name (a rewritten checkpoint or detector is a
new key, a copy of one at another path is not) and the package's own source, so a code change never serves a stale
model. Off by default: a production repository is written by ``embedstream export-models``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path

from embedstream.config import EncoderSettings
from embedstream.encoders import EncoderSpec
from embedstream.export.triton_config import ExportTarget

ENV = "EMBEDSTREAM_EXPORT_CACHE"
_NAME_FILE = "entry.name"
_PACKAGE = Path(__file__).resolve().parents[1]

Exporter = Callable[[EncoderSettings, Path, ExportTarget], EncoderSpec]


def cache_dir() -> Path | None:
    """The cache directory the environment names, or None (no caching)."""
    raw = os.environ.get(ENV, "").strip()
    return Path(raw) if raw else None


@cache
def source_digest() -> bytes:
    """The package's own source: what was made by other code is not reused."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.digest()


def _content(raw: str | None) -> str | None:
    """What a setting that names a file stands for: the file's bytes (and its .json sidecar's), not its path.

    A directory (a Hugging Face model named as ``arch``) is its files' relative names, sizes and times.
    """
    if not raw:
        return raw
    path = Path(raw)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif path.is_file():
        h.update(path.read_bytes())
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():  # a detector's or a trained encoder's settings live beside its tensors
            h.update(sidecar.read_bytes())
    else:
        return raw  # a name (an architecture, "random"), not a file
    return f"sha256:{h.hexdigest()}"


def cache_key(settings: EncoderSettings, target: ExportTarget) -> str:
    named = {f: _content(getattr(settings, f)) for f in ("arch", "weights", "detector")}
    h = hashlib.sha256(source_digest())
    h.update(settings.model_copy(update=named).model_dump_json().encode())
    h.update(repr(target).encode())
    return h.hexdigest()[:32]


def cached_entry(entry: Path, build: Callable[[Path], str]) -> str:
    """``entry`` made once: ``build(staging)`` fills a directory of this process's own and returns a
    name worth keeping (the model's, the weights file's), which is stored beside what it built; then
    the directory becomes ``entry`` in one rename. A concurrent builder of the same entry loses the
    rename, harmlessly. Returns the stored name."""
    if not (entry / _NAME_FILE).is_file():
        staging = entry.parent / f".{entry.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / _NAME_FILE).parent.mkdir(parents=True, exist_ok=True)
        name = build(staging)
        (staging / _NAME_FILE).write_text(name)
        try:
            staging.rename(entry)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return (entry / _NAME_FILE).read_text()


def export_cached(
    settings: EncoderSettings, repo: Path, target: ExportTarget, root: Path, export: Exporter
) -> EncoderSpec:
    """``export`` into ``root`` once per key, then the cached model copied into ``repo``."""
    entry = root / cache_key(settings, target)
    name = cached_entry(entry, lambda staging: export(settings, staging, target).name)
    for version in (p for p in (entry / name).iterdir() if p.is_dir()):
        shutil.rmtree(Path(repo) / name / version.name, ignore_errors=True)  # as an export replaces its version
    shutil.copytree(entry / name, Path(repo) / name, dirs_exist_ok=True)
    return EncoderSpec.from_json((entry / name / "spec.json").read_bytes())
