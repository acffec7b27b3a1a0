"""Encoder specs and the families that build them; importing a family registers it."""

from embedstream.encoders import autoencoder, cnn, lstm, transformer
from embedstream.encoders import null as null  # registers the plumbing-only family used by `embedstream bench`
from embedstream.encoders._registry import EncoderFamily, get_family, list_families, register_family
from embedstream.encoders._spec import EncoderSpec, ImagePreprocessing, TensorSpec

__all__ = [
    "EncoderFamily",
    "EncoderSpec",
    "ImagePreprocessing",
    "TensorSpec",
    "autoencoder",
    "cnn",
    "get_family",
    "list_families",
    "lstm",
    "register_family",
    "transformer",
]
