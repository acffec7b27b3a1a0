"""The export cache: an unchanged encoder is exported once; what makes the export changes the key."""

from __future__ import annotations

import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from embedstream.config import EncoderSettings
from embedstream.export import ExportTarget, export_model
from embedstream.export import cache as export_cache
from embedstream.local.stack import stack as local_stack

AE = EncoderSettings(family="autoencoder", arch="w16c3h16l4", weights="random", max_batch_size=16)


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, settings, repo, target):
        self.calls += 1
        return export_model(settings, repo, target)


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_encoder_is_exported_once_and_copied_whole(tmp_path):
    export, target = Counting(), ExportTarget()
    a = export_cache.export_cached(AE, tmp_path / "repo-a", target, tmp_path / "cache", export)
    b = export_cache.export_cached(AE, tmp_path / "repo-b", target, tmp_path / "cache", export)
    assert export.calls == 1 and a == b
    assert files(tmp_path / "repo-a") == files(tmp_path / "repo-b")
    assert (tmp_path / "repo-b" / a.name / "1" / "model.pt").is_file()
    # Another target (its Triton config differs) is another export.
    export_cache.export_cached(AE, tmp_path / "repo-c", ExportTarget(instances=2), tmp_path / "cache", export)
    assert export.calls == 2


def test_weights_are_keyed_by_content_not_path_and_code_changes_miss(tmp_path, monkeypatch):
    ckpt = tmp_path / "ae.safetensors"
    from embedstream.encoders import get_family

    tensors = {k: v.numpy() for k, v in get_family("autoencoder").build(AE).state_dict().items()}
    save_file(tensors, str(ckpt))
    shutil.copy(ckpt, tmp_path / "copy.safetensors")
    weighted = AE.model_copy(update={"weights": str(ckpt)})
    key = export_cache.cache_key(weighted, ExportTarget())
    same_bytes = AE.model_copy(update={"weights": str(tmp_path / "copy.safetensors")})
    assert export_cache.cache_key(same_bytes, ExportTarget()) == key
    changed = {k: v + np.float32(1) for k, v in load_file(str(ckpt)).items()}
    save_file(changed, str(ckpt))
    assert export_cache.cache_key(weighted, ExportTarget()) != key
    before = export_cache.cache_key(AE, ExportTarget())
    monkeypatch.setattr(export_cache, "source_digest", lambda: b"other code")
    assert export_cache.cache_key(AE, ExportTarget()) != before


def test_the_local_stack_exports_through_the_cache_only_when_one_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(export_cache.ENV, raising=False)
    assert local_stack._default_exporter() is export_model
    monkeypatch.setenv(export_cache.ENV, str(tmp_path / "cache"))
    cached = local_stack._default_exporter()
    spec = cached(AE, tmp_path / "repo", ExportTarget())
    assert (tmp_path / "repo" / spec.name / "spec.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [export_cache.cache_key(AE, ExportTarget())]
