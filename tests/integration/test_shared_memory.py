"""Inputs through Triton system shared memory on the real local server, and the fallback to the wire."""

from __future__ import annotations

import numpy as np
import pytest

from embedstream.inference.triton import TritonBackend
from embedstream.service import encoder_spec

pytestmark = pytest.mark.integration


def _batch(settings, n=4):
    spec = encoder_spec(settings)
    rng = np.random.default_rng(3)
    return spec, (rng.integers(0, 256, (n, *spec.inputs[0].dims), dtype=np.uint8),)


def _backend(settings, mode):
    triton = settings.triton.model_copy(update={"shared_memory": mode})
    return TritonBackend(triton, encoder_spec(settings))


def test_images_go_through_a_registered_region_and_embed_as_on_the_wire(stack):
    settings = stack.settings
    _spec, batch = _batch(settings)
    shm, wire = _backend(settings, "auto"), _backend(settings, "off")
    try:
        via_shm = shm.infer(batch)
        assert shm.shared_memory_regions == 1  # a refused region would silently fall back to the wire
        via_wire = wire.infer(batch)
        assert wire.shared_memory_regions == 0
        for name, got in via_shm.items():
            np.testing.assert_allclose(got, via_wire[name], rtol=1e-5, atol=1e-5)
    finally:
        shm.close()
        wire.close()
    assert shm.shared_memory_regions == 0  # closed regions are unregistered and freed


def test_a_region_the_server_forgot_is_made_again(stack):
    settings = stack.settings
    _spec, batch = _batch(settings, 2)
    backend = _backend(settings, "auto")
    try:
        backend.infer(batch)
        # What a restarted server looks like to the worker: it no longer knows our region.
        assert backend._regions[0].unregister()
        out = backend.infer(batch)  # retried once with a new region
        assert out[backend.spec.embedding_output.name].shape[0] == 2
        assert backend.shared_memory_regions == 1
    finally:
        backend.close()
