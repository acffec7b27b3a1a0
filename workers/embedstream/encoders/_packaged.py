"""Which encoders come with weights installed beside the code, so unset weights mean those.

Torch-free: it reads file locations and names only, so the CLI can apply the weights rule before
anything is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedstream.encoders import _packaged_images
from embedstream.encoders._names import resolve_source
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
        return _packaged_images.has_packaged_weights(settings.arch)
    if settings.family == "transformer":
        try:
            return resolve_source(settings.arch)[1]
        except ConfigError:
            return False
    return False
