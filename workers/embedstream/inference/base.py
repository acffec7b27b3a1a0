"""What the worker needs from an inference backend."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from embedstream.encoders import EncoderSpec


class InferenceBackend(Protocol):
    spec: EncoderSpec

    def verify(self, batch_size: int) -> None:
        """Fail with ModelMismatchError if the served model cannot take batches as the spec says."""

    def infer(self, inputs: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output of the spec by name, the (N, dim) embedding first."""

    def ready(self) -> bool:
        """Whether the backend can take requests now (probed during an outage)."""

    def connect(self) -> None:
        """Open the calling thread's connection now, so the first batch on that thread does not pay for it."""

    def close(self) -> None: ...
