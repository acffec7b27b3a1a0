"""Triton system shared memory for inputs, when worker and server share a host.

A batch of 32 uint8 224x224 images is ~4.8 MB: written once into a POSIX shared-memory region and
named in the request, it skips serialisation and the socket. Each inference thread owns one region
(requests in flight must not share bytes); outputs are small and come back on the wire.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class InputRegion:
    def __init__(self, client: Any, byte_size: int) -> None:
        with warnings.catch_warnings():
            # tritonclient 2.51 finds its helper library through the deprecated pkg_resources.
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self._client = client
        self.name = f"embedstream-{os.getpid()}-{threading.get_ident()}"
        self.byte_size = byte_size
        self._handle = shm.create_shared_memory_region(self.name, f"/{self.name}", byte_size)
        try:
            client.register_system_shared_memory(self.name, f"/{self.name}", byte_size)
        except Exception:
            shm.destroy_shared_memory_region(self._handle)
            raise

    def write(self, arrays: list[np.ndarray]) -> list[tuple[int, int]]:
        """Copy the arrays in, back to back; returns (offset, size) of each."""
        spans, offset = [], 0
        for arr in arrays:
            spans.append((offset, arr.nbytes))
            offset += arr.nbytes
        if offset > self.byte_size:
            raise ValueError(f"batch of {offset} bytes exceeds the {self.byte_size}-byte region")
        self._shm.set_shared_memory_region(self._handle, arrays)
        return spans

    def unregister(self, wait_s: float = 2.0) -> bool:
        """Tell the server to forget the region; True once it has.

        The server lets go of a region a moment after it sends the response that read it, so an
        unregister right after an inference can be refused as "in use": asked again until wait_s.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._client.unregister_system_shared_memory(self.name)
                return True
            except Exception as exc:  # the server may be gone already; the region is ours to free anyway
                if "in use" not in str(exc) or time.monotonic() >= deadline:
                    log.debug("unregistering %s: %s", self.name, exc)
                    return False
            time.sleep(0.02)

    def close(self) -> None:
        self.unregister()
        self._shm.destroy_shared_memory_region(self._handle)


def fixed_input_bytes(dims_per_input: list[tuple[int, ...]], itemsizes: list[int], max_batch: int) -> int | None:
    """Bytes of the largest batch, or None when an input has a variable dimension (text)."""
    total = 0
    for dims, itemsize in zip(dims_per_input, itemsizes, strict=True):
        if any(d < 0 for d in dims):
            return None
        total += max_batch * int(np.prod(dims)) * itemsize
    return total
