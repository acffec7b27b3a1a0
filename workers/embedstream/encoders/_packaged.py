"""Which encoders come with weights installed beside the code, so unset weights mean those.

Torch-free: it reads file locations and names only, so the CLI can apply the weights rule before
anything is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedstream.encoders._names import resolve_source

# From the module, not the package: the package's __init__ imports this module.
from embedstream.encoders._packaged_images import has_packaged_weights as has_packaged_image_weights
from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings


def has_packaged_weights(settings: EncoderSettings) -> bool:
    """Whether ``encoder.weights`` left unset loads real weights without a file or a model hub.

    CNNs: the architectures of ``_packaged_images``. Transformers: a model directory, the packaged
    all-MiniLM-L6-v2 included, carries its own weights. The time-series families need the file
    ``embedstream train`` wrote; the null family loads no weights at all.
    """
    if settings.family == "cnn":
        return has_packaged_image_weights(settings.arch)
    if settings.family == "transformer":
        try:
            return resolve_source(settings.arch)[1]
        except ConfigError:
            return False
    return False


def require_weights_choice(settings: EncoderSettings) -> None:
    """Refuse, before anything starts, an encoder with weights unset and none packaged for it.

    The families raise the same error when they build; checked here too so that the local stack
    says it before it has started a broker and a Triton server.
    """
    if settings.weights is not None or settings.family == "null" or has_packaged_weights(settings):
        return
    if settings.family in ("autoencoder", "lstm"):
        raise ConfigError(
            f"encoder.weights is not set for the {settings.family} encoder: give the .safetensors file "
            "`embedstream train` wrote, or 'random' (embeddings without meaning, for trying the pipeline)"
        )
    hub = "'pretrained' (downloads from the model hub), " if settings.family in ("cnn", "transformer") else ""
    raise ConfigError(
        f"encoder.weights is not set and no weights are packaged for {settings.family}/{settings.arch}: "
        f"give a checkpoint path, {hub}or 'random' (embeddings without meaning, for trying the pipeline)"
    )
