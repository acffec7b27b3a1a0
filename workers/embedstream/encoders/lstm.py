"""LSTM time-series encoder: a (T x C) float32 window -> the final hidden state of the last layer.

Trained by ``embedstream train`` (next-step prediction; the prediction head is not served). The
per-channel normalisation fitted on the training data lives in the module as buffers, so the worker
sends raw values and the server normalises.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from embedstream.encoders._names import window_model_name
from embedstream.encoders._registry import EncoderFamily, register_family
from embedstream.encoders._sidecar import Sidecar, load_sidecar
from embedstream.encoders._spec import EncoderSpec, TensorSpec
from embedstream.encoders._weights import load_weights

if TYPE_CHECKING:
    from embedstream.config import EncoderSettings

INPUT_NAME = "window__0"
OUTPUT_NAME = "embedding__0"


class LSTMEncoder(torch.nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, channels: int, hidden: int, layers: int = 1, mean: tuple[float, ...] = (), std: tuple[float, ...] = ()
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * channels, dtype=torch.float32).view(1, 1, -1))
        self.register_buffer("std", torch.tensor(std or (1.0,) * channels, dtype=torch.float32).view(1, 1, -1))
        self.lstm = torch.nn.LSTM(channels, hidden, num_layers=layers, batch_first=True)

    def sequence(self, window: torch.Tensor) -> torch.Tensor:
        """Hidden states at every step (N, T, H): what the training objective reads."""
        out, _ = self.lstm((window - self.mean) / self.std)
        return out

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm((window - self.mean) / self.std)
        return h[-1]


def window_spec(family: str, settings: EncoderSettings, side: Sidecar, outputs: tuple[TensorSpec, ...]) -> EncoderSpec:
    """The spec both time-series families share: one FP32 window input, sizes and provenance from the sidecar."""
    weights = settings.weights or "random"
    extra = {
        "window_length": side.window_length,
        "channels": side.channels,
        "hidden": side.hidden,
        "latent": side.latent,
        "layers": side.layers,
        "threshold": side.threshold,
        "threshold_rule": dict(side.threshold_rule),
        # The normalisation the served module applies (its buffers): untrained means none.
        "mean": list(side.mean or (0.0,) * side.channels),
        "std": list(side.std or (1.0,) * side.channels),
    }
    return EncoderSpec(
        name=window_model_name(family, settings),
        version=settings.version,
        modality="timeseries",
        family=family,
        source="random" if weights == "random" else f"embedstream-train/{Path(weights).name}",
        inputs=(TensorSpec(INPUT_NAME, "FP32", (side.window_length, side.channels)),),
        outputs=outputs,
        embedding_dim=outputs[0].dims[0],
        max_batch_size=settings.max_batch_size,
        extra=extra,
    )


def describe(settings: EncoderSettings) -> EncoderSpec:
    side = load_sidecar("lstm", settings.weights, settings.arch)
    return window_spec("lstm", settings, side, (TensorSpec(OUTPUT_NAME, "FP32", (side.hidden,)),))


def build(settings: EncoderSettings) -> torch.nn.Module:
    side = load_sidecar("lstm", settings.weights, settings.arch)
    return load_weights(
        settings.weights,
        lambda: LSTMEncoder(side.channels, side.hidden, side.layers, side.mean, side.std),
        what="lstm encoder",
        seed=settings.seed,
        fit="strict",
    )


def example_inputs(spec: EncoderSpec, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, *spec.inputs[0].dims),)


FAMILY = register_family(EncoderFamily(name="lstm", describe=describe, build=build, example_inputs=example_inputs))
