"""In-process torch inference: the bare model the pipeline is compared against."""

from __future__ import annotations

import numpy as np
import torch

from embedstream.encoders import EncoderSpec


class TorchBackend:
    def __init__(self, spec: EncoderSpec, module: torch.nn.Module) -> None:
        self.spec = spec
        self._module = module.eval()

    def verify(self, batch_size: int) -> None:
        return None

    def infer(self, inputs: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self._module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        outs = out if isinstance(out, tuple) else (out,)
        return {spec.name: t.numpy() for spec, t in zip(self.spec.outputs, outs, strict=True)}

    def connect(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        return None
