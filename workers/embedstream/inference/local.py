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

    def infer(self, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
        with torch.inference_mode():
            out = self._module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        return out.float().numpy()

    def close(self) -> None:
        return None
