"""The trained-weights artifact: ``<name>.safetensors`` (tensors only) + ``<name>.json`` (the sidecar).

The sidecar carries what is needed to rebuild the module before loading the tensors (window length,
channels, layer sizes) and what a reader wants without torch (normalisation, anomaly threshold and
how it was fitted). Tensors never travel as pickles: safetensors holds the weights and the
normalisation/threshold buffers, and the JSON repeats the latter for people and other tools.
``embedstream train`` writes it and the time-series families read it; it lives with the encoders so
that reading one imports neither torch nor the training code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedstream.errors import ConfigError

FORMAT = "embedstream.timeseries/1"
# With weights="random" (pipeline trials, tests) the sizes come from ``encoder.arch``:
# w<window>c<channels>h<hidden>[l<latent>], e.g. "w32c3h16" (lstm) or "w32c3h64l8" (autoencoder).
_SIZE_SPEC = re.compile(r"^w(\d+)c(\d+)h(\d+)(?:l(\d+))?$")
# A threshold no float32 error reaches: the flag of an untrained model is always false.
NEVER = 3.0e38


def read_json_sidecar(path: Path, fmt: str, what: str, writer: str) -> dict[str, Any]:
    """A sidecar's JSON object, refused with a clear error when absent, not JSON, or of another format.

    ``what`` names the file in errors ("sidecar", "detector sidecar"); ``writer`` says what writes it.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found: {writer}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise ConfigError(f"{what} {path}: format {found!r} is not {fmt!r}")
    return data


@dataclass(frozen=True)
class Sidecar:
    family: str
    window_length: int
    channels: int
    hidden: int
    latent: int | None = None
    layers: int = 1
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    threshold: float | None = None
    threshold_rule: dict[str, Any] = field(default_factory=dict)
    channel_names: tuple[str, ...] = ()
    training: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> Sidecar:
        data = read_json_sidecar(path, FORMAT, "sidecar", "`embedstream train` writes it beside the weights")
        try:
            side = cls(
                **{
                    **data,
                    "mean": tuple(data.get("mean", ())),
                    "std": tuple(data.get("std", ())),
                    "channel_names": tuple(data.get("channel_names", ())),
                }
            )
        except TypeError as exc:
            raise ConfigError(f"sidecar {path}: {exc}") from None
        side.check(path)
        return side

    def check(self, where: object) -> None:
        if min(self.window_length, self.channels, self.hidden, self.layers) < 1:
            raise ConfigError(f"{where}: window_length, channels, hidden and layers must be positive")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values and len(values) != self.channels:
                raise ConfigError(f"{where}: {name} has {len(values)} values for {self.channels} channels")
        if any(s <= 0 or not math.isfinite(s) for s in self.std):
            raise ConfigError(f"{where}: std must be finite and positive")


def sidecar_path(weights: Path | str) -> Path:
    return Path(weights).with_suffix(".json")


def load_sidecar(family: str, weights: str | None, arch: str) -> Sidecar:
    """The sizes of a time-series encoder: from the trained sidecar, or from ``arch`` for random weights."""
    if weights is None:
        raise ConfigError(
            f"encoder.weights is not set: give the .safetensors written by `embedstream train` (its .json sidecar "
            f"beside it), or 'random' with encoder.arch like 'w32c3h16' for the {family} family"
        )
    if weights == "random":
        m = _SIZE_SPEC.match(arch)
        if m is None:
            raise ConfigError(
                f"{family} with random weights takes its sizes from encoder.arch as w<window>c<channels>h<hidden>"
                f"[l<latent>] (e.g. 'w32c3h16l8'), not {arch!r}"
            )
        window, channels, hidden, latent = (int(g) if g else None for g in m.groups())
        assert window is not None and channels is not None and hidden is not None
        if family == "autoencoder" and latent is None:
            raise ConfigError(f"the autoencoder needs a latent: encoder.arch like 'w{window}c{channels}h{hidden}l8'")
        side = Sidecar(family=family, window_length=window, channels=channels, hidden=hidden, latent=latent)
        side.check(f"encoder.arch {arch!r}")
        return side
    path = Path(weights)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{family} weights must be a .safetensors file (never a pickle), got {path}")
    if not path.is_file():
        raise ConfigError(f"encoder weights file not found: {path}")
    side = Sidecar.read(sidecar_path(path))
    if side.family != family:
        raise ConfigError(f"{path} holds a {side.family!r} model, but encoder.family is {family!r}")
    return side
