"""Inference backends: Triton for real work, in-process torch as the reference the tests compare to."""

from embedstream.inference.base import InferenceBackend

__all__ = ["InferenceBackend"]
