"""Encoder specs and the families that build them.

The spec types import nothing heavy. A family module (which imports torch) is imported the first
time its name is looked up, so code that only reads specs never loads a network library.
"""

from embedstream.encoders._registry import EncoderFamily, get_family, list_families, register_family
from embedstream.encoders._spec import EncoderSpec, ImagePreprocessing, TensorSpec

__all__ = [
    "EncoderFamily",
    "EncoderSpec",
    "ImagePreprocessing",
    "TensorSpec",
    "get_family",
    "list_families",
    "register_family",
]
