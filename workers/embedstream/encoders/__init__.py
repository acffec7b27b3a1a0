"""Encoder specs, the families that build them, and the served model's name.

The spec types and the naming rules import nothing heavy. A family module (which imports torch) is
imported the first time its name is looked up, so code that only reads specs or names a served
model never loads a network library.

What code outside this package needs from the private modules is re-exported here, all of it
torch-free, so the rest of the package never reaches into ``encoders._*``.
"""

from embedstream.encoders._names import (
    NULL_FAMILY,
    TOKENIZER_FILE,
    imitated,
    null_model_name,
    packaged_model_dir,
    resolve_source,
    served_model_name,
    tokenizer_file,
)
from embedstream.encoders._packaged import has_packaged_weights, require_weights_choice
from embedstream.encoders._packaged_images import weights_file as packaged_image_weights
from embedstream.encoders._registry import (
    EncoderFamily,
    describe,
    get_family,
    list_families,
    register_family,
    require_known,
)
from embedstream.encoders._sidecar import Sidecar, read_json_sidecar, sidecar_path
from embedstream.encoders._spec import EncoderSpec, ImagePreprocessing, TensorSpec

__all__ = [
    "NULL_FAMILY",
    "TOKENIZER_FILE",
    "EncoderFamily",
    "EncoderSpec",
    "ImagePreprocessing",
    "Sidecar",
    "TensorSpec",
    "describe",
    "get_family",
    "has_packaged_weights",
    "imitated",
    "list_families",
    "null_model_name",
    "packaged_image_weights",
    "packaged_model_dir",
    "read_json_sidecar",
    "register_family",
    "require_known",
    "require_weights_choice",
    "resolve_source",
    "served_model_name",
    "sidecar_path",
    "tokenizer_file",
]
