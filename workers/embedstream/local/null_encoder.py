"""Null encoder: the inputs of a real encoder, an embedding of zeros, no compute.

It exists to measure the pipeline's plumbing (consume, decode, batch, the Triton round trip,
Arrow, produce, commit) without the model's cost: ``embedstream bench`` runs the same messages
through it and through the real encoder. ``encoder.arch`` names the real encoder it imitates as
``<family>/<arch>`` (e.g. ``cnn/mobilenetv3_small_100``, ``transformer/all-MiniLM-L6-v2``,
``autoencoder/w32c3h16l8``); ``encoder.weights`` is handed to that family's ``describe`` only (the
time-series families read their window shape from the weights' sidecar), never loaded. The spec
keeps the real one's inputs, preprocessing, extra and embedding width, so the worker decodes the
same way and publishes rows of the same size; only the first output (the embedding) is kept.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from embedstream.encoders import (
    NULL_FAMILY,
    EncoderFamily,
    EncoderSpec,
    get_family,
    imitated,
    null_model_name,
    register_family,
)
from embedstream.modalities import defaults

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings

# The null family's naming rule and ``imitated`` live in encoders._names with the other families'
# rules, so a worker finds the null model's name without importing this module (and torch).
NAME = NULL_FAMILY


class NullEncoder(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, first: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        # Sized from the input so a trace keeps the batch dimension dynamic.
        zeros = torch.zeros(first.shape[0], self.dim, dtype=torch.float32)
        # Every input reaches the output (times zero, one element a row): the ONNX exporter drops
        # inputs a graph does not use, and the served model must take what the real one takes.
        touched = sum(t.reshape(t.shape[0], -1)[:, :1].to(torch.float32) for t in (first, *rest))
        return zeros + 0.0 * touched


def describe(settings: EncoderSettings) -> EncoderSpec:
    inner = imitated(settings)
    real = get_family(inner.family).describe(inner)
    return dataclasses.replace(
        real,
        name=null_model_name(settings),
        family=NAME,
        source=f"null/{real.source}",
        outputs=real.outputs[:1],
        extra={**real.extra, "imitates": real.name},
    )


def build(settings: EncoderSettings) -> torch.nn.Module:
    return NullEncoder(describe(settings).embedding_dim).eval()


def example_inputs(spec: EncoderSpec, batch: int) -> tuple[torch.Tensor, ...]:
    # The modality's first family's example inputs depend only on the spec's inputs and extra, which
    # the null spec keeps.
    return get_family(defaults(spec.modality).families[0]).example_inputs(spec, batch)


FAMILY = register_family(EncoderFamily(name=NAME, describe=describe, build=build, example_inputs=example_inputs))
