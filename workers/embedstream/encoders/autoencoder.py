"""Window autoencoder: a (T x C) window -> latent embedding, reconstruction error and an anomaly flag.

Outputs, in order: ``embedding__0`` (latent, FP32), ``reconstruction_error__1`` (FP32, column
``reconstruction_error``: mean squared error over the normalised window) and ``anomaly__2`` (BOOL,
column ``anomaly``: error above the threshold fitted on held-out normal windows by ``embedstream
train``). Normalisation and threshold are buffers of the module, saved in the safetensors file and
repeated in the JSON sidecar, so the served model computes the flag and the worker stays generic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from embedstream.encoders._registry import EncoderFamily, register_family
from embedstream.encoders._sidecar import NEVER, load_sidecar
from embedstream.encoders._spec import EncoderSpec, TensorSpec, TritonDType
from embedstream.encoders._weights import load_weights
from embedstream.encoders.lstm import window_spec

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings

OUTPUTS: tuple[tuple[str, TritonDType, str | None], ...] = (
    ("embedding__0", "FP32", None),
    ("reconstruction_error__1", "FP32", "reconstruction_error"),
    ("anomaly__2", "BOOL", "anomaly"),
)


class WindowAutoencoder(torch.nn.Module):
    mean: torch.Tensor
    std: torch.Tensor
    threshold: torch.Tensor

    def __init__(
        self,
        window: int,
        channels: int,
        hidden: int,
        latent: int,
        mean: tuple[float, ...] = (),
        std: tuple[float, ...] = (),
        threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * channels, dtype=torch.float32).view(1, 1, -1))
        self.register_buffer("std", torch.tensor(std or (1.0,) * channels, dtype=torch.float32).view(1, 1, -1))
        self.register_buffer("threshold", torch.tensor([NEVER if threshold is None else threshold]))
        flat = window * channels
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(flat, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, latent)
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, flat)
        )

    def errors(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (N, latent) and per-window reconstruction error (N, 1), in normalised units."""
        x = ((window - self.mean) / self.std).flatten(1)
        z = self.encoder(x)
        return z, ((self.decoder(z) - x) ** 2).mean(dim=1, keepdim=True)

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, err = self.errors(window)
        return z, err, err > self.threshold


def describe(settings: EncoderSettings) -> EncoderSpec:
    side = load_sidecar("autoencoder", settings.weights, settings.arch)
    assert side.latent is not None
    dims = {"embedding__0": (side.latent,)}
    outputs = tuple(TensorSpec(name, dtype, dims.get(name, (1,)), column) for name, dtype, column in OUTPUTS)
    return window_spec("autoencoder", settings, side, outputs)


def build(settings: EncoderSettings) -> torch.nn.Module:
    side = load_sidecar("autoencoder", settings.weights, settings.arch)
    latent = side.latent
    assert latent is not None  # load_sidecar refuses an autoencoder without one

    def architecture() -> torch.nn.Module:
        return WindowAutoencoder(
            side.window_length, side.channels, side.hidden, latent, side.mean, side.std, side.threshold
        )

    return load_weights(
        settings.weights,
        architecture,
        what="autoencoder",
        seed=settings.seed,
        fit="strict",
        random_means="embeddings and anomaly flags carry no meaning",
    )


def example_inputs(spec: EncoderSpec, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, *spec.inputs[0].dims),)


FAMILY = register_family(
    EncoderFamily(name="autoencoder", describe=describe, build=build, example_inputs=example_inputs)
)
