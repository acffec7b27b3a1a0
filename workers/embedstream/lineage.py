"""Lineage fingerprints: which weights and which preprocessing a served encoder stands for.

Two deployments can both say ``image-x:1`` and embed differently, because the version is a label
someone chose. The fingerprints are computed from what is served instead:

- **weights**: sha256 over every tensor of the exported module's state dict (name, dtype, shape and
  bytes, in name order). Buffers count: the image encoder's normalisation constants and the
  time-series encoders' fitted normalisation and anomaly threshold are buffers of the served module.
- **preprocessing**: sha256 over the canonical JSON of what happens between the raw input and the
  network's input tensor on the worker: image size, resize and crop rule, interpolation, mean/std;
  the tokenizer file's content and the max length; the window, channels and normalisation.

Both are the first :data:`CHARS` hex characters. The exporter writes them into the spec; the worker
reads them from the served spec and holds them against its pins (:func:`pin_problems`). Torch is
imported only inside the functions that take tensors, so the worker side can import this module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import torch

    from embedstream.encoders import EncoderSpec

CHARS = 16
# What outputs and logs say for a model exported before fingerprints existed.
UNKNOWN = "unknown"
PATTERN = re.compile(rf"^[0-9a-f]{{{CHARS}}}$")
# The worker's image rule (modalities/image.py): shorter side resized to resize_shorter_to, then
# centre-cropped to height x width, RGB uint8. A change to that rule that moves pixels must change this.
# v2: sizes and crop offsets as torchvision's, JPEG drafted to no less than twice the target.
IMAGE_RULE = "rgb-uint8/resize-shorter/centre-crop/v2"
_CHUNK = 1 << 20


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of a state dict: the same tensors give the same value, on any machine.

    ``export/triton_python_model.py`` computes the same over the module Triton loaded and refuses to
    serve one whose value is not the spec's; keep the two in step.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        # json, not orjson: export/triton_python_model.py repeats this in the server, which has only json.
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)], separators=(",", ":"), ensure_ascii=False)
        header_bytes = header.encode()
        digest.update(len(header_bytes).to_bytes(4, "little") + header_bytes)
        # Raw bytes through a uint8 view: works for every dtype, bfloat16 and bool included.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:CHARS]


def module_fingerprint(module: torch.nn.Module) -> str:
    """The fingerprint of the weights an export from ``module`` serves, whichever file holds them.

    A TorchScript trace keeps non-persistent buffers (e.g. a transformer's position ids) in its state
    dict; counted here too, a module and its trace name the same fingerprint.
    """
    return weights_fingerprint({**module.state_dict(), **dict(module.named_buffers(remove_duplicate=False))})


def file_sha256(path: Path | str) -> str:
    """Full sha256 of a file's content (the tokenizer's ``tokenizer.json``)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def preprocessing_description(spec: EncoderSpec) -> dict[str, Any]:
    """What the fingerprint covers, as plain data (``docs/lineage.md`` lists it per modality)."""
    described: dict[str, Any] = {
        "modality": spec.modality,
        "inputs": [[t.name, t.dtype, list(t.dims)] for t in spec.inputs],
    }
    extra = spec.extra
    if spec.modality == "image" and spec.preprocessing is not None:
        described["image"] = {**asdict(spec.preprocessing), "rule": IMAGE_RULE}
    elif spec.modality == "text":
        described["text"] = {k: extra.get(k) for k in ("tokenizer_sha256", "max_length", "pad_token_id")}
    elif spec.modality == "timeseries":
        described["timeseries"] = {k: extra.get(k) for k in ("window_length", "channels", "mean", "std")}
    return described


def preprocessing_fingerprint(spec: EncoderSpec) -> str:
    canonical = orjson.dumps(preprocessing_description(spec), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:CHARS]


def served(value: str | None) -> str:
    """A spec's fingerprint as outputs carry it: the value, or ``unknown`` for an older export."""
    return value or UNKNOWN


def pin_problems(spec: EncoderSpec, weights_pin: str | None, preprocessing_pin: str | None) -> list[str]:
    """Where the served fingerprints differ from the pins in the worker's settings (none set: none)."""
    problems = []
    for what, setting, pin, have in (
        ("weights", "encoder.weights_fingerprint", weights_pin, spec.weights_sha256),
        ("preprocessing", "encoder.preprocessing_fingerprint", preprocessing_pin, spec.preprocessing_sha256),
    ):
        if pin and pin != have:
            problems.append(
                f"{what} fingerprint {served(have)!r} is served, {setting} pins {pin!r}"
                + ("" if have else " (the model was exported before fingerprints: re-export it)")
            )
    return problems
