"""Encoder specs, the families that build them, and the served model's name.

The spec types and the naming rules import nothing heavy. A family module (which imports torch) is
imported the first time its name is looked up, so code that only reads specs or names a served
model never loads a network library.
"""

from embedstream.encoders._names import served_model_name
from embedstream.encoders._registry import (
    EncoderFamily,
    describe,
    get_family,
    list_families,
    register_family,
    require_known,
)
from embedstream.encoders._spec import EncoderSpec, ImagePreprocessing, TensorSpec

__all__ = [
    "EncoderFamily",
    "EncoderSpec",
    "ImagePreprocessing",
    "TensorSpec",
    "describe",
    "get_family",
    "list_families",
    "register_family",
    "require_known",
    "served_model_name",
]
