"""Weights for every encoder family: a checkpoint file, the family's model hub, or a seeded random init.

``encoder.weights`` chooses one of

- a checkpoint path: ``.safetensors``, or a torch file read with ``weights_only=True`` (which refuses
  pickled code, so a checkpoint can carry tensors and nothing else); how closely its tensors must fit
  the module is the family's :data:`Fit`;
- ``"pretrained"``: the family's own hub call (timm, transformers); a family without one refuses it;
- ``"random"``: seeded initialisation, with a warning, for trying the pipeline;
- unset: the weights that ship with the architecture in a package, where it has some
  (``_packaged_images``); else the family's ``unset`` rule.

The time-series families check their sidecar (``_sidecar.load_sidecar``) before they get here, which
is where their own rules (a ``.safetensors`` file with a ``.json`` beside it) are enforced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from embedstream.errors import ConfigError

log = logging.getLogger(__name__)

# "lenient": tensors the module has no use for (a classifier head beside pooled features) are dropped
# with a log line, a tensor the module needs and the file lacks fails.
# "strict": exactly the module's tensors, each of the module's shape (weights the project trained itself).
Fit = Literal["lenient", "strict"]
Unset = Literal["refuse", "pretrained"]


def load_weights(
    weights: str | None,
    architecture: Callable[[], torch.nn.Module],
    *,
    what: str,
    seed: int,
    fit: Fit,
    pretrained: Callable[[], torch.nn.Module] | None = None,
    packaged: Callable[[], torch.nn.Module] | None = None,
    unset: Unset = "refuse",
    random_means: str = "embeddings carry no meaning",
) -> torch.nn.Module:
    """The module with the weights ``weights`` names, in eval mode.

    ``architecture`` builds the untrained module, ``pretrained`` the hub's, ``packaged`` the module
    with the weights installed beside it. ``unset`` says what no weights at all means where nothing
    is packaged: refuse (most families), or the model directory's own weights (a transformer
    directory carries them). ``what`` names the encoder in log lines and errors.
    """
    if weights is None and packaged is not None:
        return packaged().eval()
    if weights is None:
        if unset == "pretrained" and pretrained is not None:
            return pretrained().eval()
        hub = "'pretrained' (downloads from the model hub), " if pretrained is not None else ""
        raise ConfigError(
            f"encoder.weights is not set: give a checkpoint path, {hub}"
            "or 'random' (embeddings without meaning, for trying the pipeline)"
        )
    if weights == "pretrained":
        if pretrained is None:
            raise ConfigError(f"{what} has no pretrained weights on a model hub: give a checkpoint path or 'random'")
        return pretrained().eval()
    if weights == "random":
        log.warning("%s uses random weights, as configured: %s", what, random_means)
        torch.manual_seed(seed)
        return architecture().eval()
    module = architecture()
    load_checkpoint(module, Path(weights), fit)
    return module.eval()


def load_checkpoint(module: torch.nn.Module, path: Path, fit: Fit) -> None:
    if not path.is_file():
        raise ConfigError(f"encoder weights file not found: {path} (use 'random' or 'pretrained' to opt out)")
    load_state(module, read_state(path), fit, path)


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], fit: Fit, origin: Path) -> None:
    """Load ``state`` (read from ``origin``) into ``module`` as closely as ``fit`` demands."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if fit == "strict":
        if missing or unexpected:
            raise ConfigError(f"{origin} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ConfigError(f"{origin}: tensor {k} is {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
    else:
        if missing:
            raise ConfigError(f"checkpoint {origin} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
        if unexpected:
            log.info("checkpoint %s: ignoring %d tensors the pooled model has no use for", origin, len(unexpected))
            state = {k: v for k, v in state.items() if k in own}
    module.load_state_dict(state)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only refuses pickled code objects: a checkpoint can carry tensors, nothing else.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"checkpoint {path} holds no state dict (a mapping of tensor names to tensors)")
    return {str(k): v for k, v in raw.items()}
