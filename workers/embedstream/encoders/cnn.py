"""CNN image encoders on timm: any architecture, pooled features, timm's own preprocessing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from embedstream.encoders import _packaged_images
from embedstream.encoders._names import image_model_name
from embedstream.encoders._registry import EncoderFamily, register_family
from embedstream.encoders._spec import EncoderSpec, ImagePreprocessing, TensorSpec
from embedstream.encoders._weights import load_weights
from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings

INPUT_NAME = "pixels__0"
OUTPUT_NAME = "embedding__0"


class UInt8ImageEncoder(torch.nn.Module):
    """Takes uint8 NHWC pixels, normalises on the server, returns pooled features.

    Normalising here keeps the wire format at one byte per channel and lets the GPU do it.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, backbone: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.backbone(x)


@lru_cache(maxsize=8)
def _probe(arch: str) -> tuple[int, dict[str, Any]]:
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
        mean=_rgb(data_cfg["mean"], "mean", settings.arch),
        std=_rgb(data_cfg["std"], "std", settings.arch),
    )
    return EncoderSpec(
        name=image_model_name(settings),
        version=settings.version,
        modality="image",
        family="cnn",
        source=_source(settings),
        inputs=(TensorSpec(INPUT_NAME, "UINT8", (height, width, 3)),),
        outputs=(TensorSpec(OUTPUT_NAME, "FP32", (dim,)),),
        embedding_dim=dim,
        max_batch_size=settings.max_batch_size,
        preprocessing=prep,
    )


def _source(settings: EncoderSettings) -> str:
    if settings.weights is None and _packaged_images.has_packaged_weights(settings.arch):
        return f"timm/{settings.arch}+{_packaged_images.PACKAGES[settings.arch].replace('_', '-')}"
    return f"timm/{settings.arch}"


def _rgb(values: Sequence[float], what: str, arch: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ConfigError(f"timm's {what} for {arch!r} has {len(values)} values; the image worker sends RGB")
    r, g, b = (float(v) for v in values)
    return r, g, b


def build_backbone(settings: EncoderSettings) -> torch.nn.Module:
    """The timm model with the weights the settings ask for, in eval mode."""
    import timm

    def create(pretrained: bool) -> torch.nn.Module:
        return timm.create_model(settings.arch, pretrained=pretrained, num_classes=0)

    packaged = _packaged_images.has_packaged_weights(settings.arch)
    return load_weights(
        settings.weights,
        lambda: create(False),
        pretrained=lambda: create(True),
        packaged=(lambda: _packaged_images.pooled(settings.arch)) if packaged else None,
        what=f"encoder {settings.arch}",
        seed=settings.seed,
        fit="lenient",
    )


def build(settings: EncoderSettings) -> torch.nn.Module:
    prep = describe(settings).preprocessing
    if prep is None:
        raise ConfigError(f"image encoder {settings.arch!r} has no preprocessing")
    return UInt8ImageEncoder(build_backbone(settings), prep.mean, prep.std).eval()


def example_inputs(spec: EncoderSpec, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 256, (batch, *spec.inputs[0].dims), dtype=torch.uint8),)


FAMILY = register_family(EncoderFamily(name="cnn", describe=describe, build=build, example_inputs=example_inputs))
