"""Generated sample images (no downloads): JPEG, PNG and WebP in several sizes, plus corrupt ones."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZES: tuple[tuple[int, int], ...] = ((96, 64), (320, 240), (640, 480), (480, 640), (1024, 768))
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class Sample:
    key: bytes
    value: bytes
    good: bool


def render(index: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic picture: two gradients and a disc whose place and colour depend on the index."""
    w, h = size
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = base[0] * xx / w
    img[..., 1] = base[1] * yy / h
    img[..., 2] = base[2] * (1 - xx / w)
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.3) * min(w, h)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=85) if fmt in ("JPEG", "WEBP") else img.save(buf, format=fmt)
    return buf.getvalue()


def corrupt(index: int) -> bytes:
    """A JPEG cut short after its header: decoders accept the start, then fail."""
    data = encode(render(index, (320, 240)), "JPEG")
    return data[: len(data) // 8]


def samples(count: int, bad_every: int = 0, prefix: str = "sample") -> Iterator[Sample]:
    """``count`` messages; every ``bad_every``-th one (if > 0) is corrupt."""
    for i in range(count):
        key = f"{prefix}-{i:06d}".encode()
        if bad_every and i % bad_every == bad_every - 1:
            yield Sample(key, corrupt(i), good=False)
        else:
            yield Sample(key, encode(render(i, SIZES[i % len(SIZES)]), FORMATS[i % len(FORMATS)]), good=True)
