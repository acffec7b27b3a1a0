"""CNN image encoders on timm: any architecture, pooled features, timm's own preprocessing."""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from embedstream.encoders._registry import EncoderFamily, register_family
from embedstream.encoders._spec import EncoderSpec, ImagePreprocessing, TensorSpec
from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings

log = logging.getLogger(__name__)

INPUT_NAME = "pixels__0"
OUTPUT_NAME = "embedding__0"


class UInt8ImageEncoder(torch.nn.Module):
    """Takes uint8 NHWC pixels, normalises on the server, returns pooled features.

    Normalising here keeps the wire format at one byte per channel and lets the GPU do it.
    """

    def __init__(self, backbone: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.backbone(x)


@lru_cache(maxsize=8)
def _probe(arch: str) -> tuple[int, dict]:
    import timm
    from timm.data import resolve_data_config

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise ConfigError(f"timm does not know the architecture {arch!r}: {exc}") from exc
    data_cfg = dict(resolve_data_config({}, model=model))
    # num_features is not always the pooled output width (mobilenetv3 adds a head conv): measure it.
    with torch.inference_mode():
        dim = model.eval()(torch.zeros(1, *data_cfg["input_size"])).shape[-1]
    return int(dim), data_cfg


def describe(settings: EncoderSettings) -> EncoderSpec:
    dim, data_cfg = _probe(settings.arch)
    _, height, width = data_cfg["input_size"]
    crop_pct = float(data_cfg.get("crop_pct") or 1.0)
    prep = ImagePreprocessing(
        height=height,
        width=width,
        resize_shorter_to=math.floor(min(height, width) / crop_pct),
        interpolation=str(data_cfg.get("interpolation") or "bilinear"),
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
    )
    return EncoderSpec(
        name=settings.model_name or f"image-{settings.arch}",
        version=settings.version,
        modality="image",
        family="cnn",
        source=f"timm/{settings.arch}",
        inputs=(TensorSpec(INPUT_NAME, "UINT8", (height, width, 3)),),
        outputs=(TensorSpec(OUTPUT_NAME, "FP32", (dim,)),),
        embedding_dim=dim,
        max_batch_size=settings.max_batch_size,
        preprocessing=prep,
    )


def build_backbone(settings: EncoderSettings) -> torch.nn.Module:
    """The timm model with the weights the settings ask for, in eval mode."""
    import timm

    weights = settings.weights
    if weights is None:
        raise ConfigError(
            "encoder.weights is not set: give a checkpoint path, 'pretrained' (downloads from the model hub), "
            "or 'random' (embeddings without meaning, for trying the pipeline)"
        )
    if weights == "pretrained":
        model = timm.create_model(settings.arch, pretrained=True, num_classes=0)
    elif weights == "random":
        log.warning("encoder %s uses random weights, as configured: embeddings carry no meaning", settings.arch)
        torch.manual_seed(settings.seed)
        model = timm.create_model(settings.arch, pretrained=False, num_classes=0)
    else:
        model = timm.create_model(settings.arch, pretrained=False, num_classes=0)
        _load_checkpoint(model, Path(weights))
    return model.eval()


def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"encoder weights file not found: {path} (use 'random' or 'pretrained' to opt out)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # weights_only refuses pickled code objects: a checkpoint can carry tensors, nothing else.
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    if unexpected:
        log.info("checkpoint %s: ignoring %d tensors the pooled model has no use for", path, len(unexpected))
    model.load_state_dict(state)


def build(settings: EncoderSettings) -> torch.nn.Module:
    prep = describe(settings).preprocessing
    if prep is None:
        raise ConfigError(f"image encoder {settings.arch!r} has no preprocessing")
    return UInt8ImageEncoder(build_backbone(settings), prep.mean, prep.std).eval()


def example_inputs(spec: EncoderSpec, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 256, (batch, *spec.inputs[0].dims), dtype=torch.uint8),)


FAMILY = register_family(EncoderFamily(name="cnn", describe=describe, build=build, example_inputs=example_inputs))
