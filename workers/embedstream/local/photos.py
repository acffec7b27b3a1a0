"""Real photos that ship inside PyPI packages, and a stream of augmented copies of them.

Two sources, read as files (neither package is imported):

- the 20 labeled ImageNet validation photos in the ``foolbox`` wheel (MIT), ``foolbox/data/
  imagenet_<n>_<class>.jpg``; the class is an ImageNet-1k index;
- the colour photographs of scikit-image's ``skimage/data`` (BSD-3-Clause package; each image's
  own terms, stated in its ``skimage.data`` docstring, are in :data:`SCIKIT_IMAGE_PHOTOS`).

The stream gives real-world variety: random crops, flips, rescales, small rotations, re-encodes as
JPEG / PNG / WebP at several sizes and qualities, and a few broken files on purpose.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from embedstream.errors import ConfigError

# file name in skimage/data -> the licence its docstring states
SCIKIT_IMAGE_PHOTOS: dict[str, str] = {
    "astronaut.png": "public domain (NASA)",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "rocket.jpg": "public domain (SpaceX)",
    "motorcycle_left.png": "Middlebury stereo dataset, free for research use",
    "hubble_deep_field.jpg": "public domain (NASA/ESA)",
}
IMAGENET_LICENSE = "foolbox sample data (MIT)"


@dataclass(frozen=True)
class Photo:
    name: str
    path: Path
    license: str
    # ImageNet-1k class index where the source labels it
    label: int | None = None

    def open(self) -> Image.Image:
        with Image.open(self.path) as img:
            return img.convert("RGB")


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the files without running the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the photo set needs the {package} package: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def imagenet_photos() -> list[Photo]:
    """The 20 labeled ImageNet validation photos of the foolbox wheel, in file order."""
    files = sorted((_package_dir("foolbox", "pip install foolbox==3.3.4") / "data").glob("imagenet_*.jpg"))
    return [Photo(f.stem, f, IMAGENET_LICENSE, int(f.stem.rsplit("_", 1)[1])) for f in files]


def scikit_image_photos() -> list[Photo]:
    """scikit-image's bundled colour photographs (not its textures, drawings or greyscale test images)."""
    root = _package_dir("skimage", "pip install scikit-image") / "data"
    return [Photo(Path(n).stem, root / n, lic) for n, lic in SCIKIT_IMAGE_PHOTOS.items() if (root / n).is_file()]


def natural_photos() -> list[Photo]:
    return imagenet_photos() + scikit_image_photos()


FORMATS = ("JPEG", "PNG", "WEBP", "JPEG")
SIZES = (96, 160, 224, 320, 480, 640)


def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A copy a camera or an upload path could have made: crop, flip, rescale, small rotation."""
    w, h = img.size
    scale = rng.uniform(0.6, 1.0)
    cw, ch = max(16, int(w * scale)), max(16, int(h * scale * rng.uniform(0.85, 1.15)))
    cw, ch = min(cw, w), min(ch, h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4:
        out = out.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=False)
    side = int(rng.choice(SIZES))
    ratio = side / max(out.size)
    return out.resize((max(8, int(out.width * ratio)), max(8, int(out.height * ratio))), Image.Resampling.BILINEAR)


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format=fmt)
    else:
        img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class PhotoMessage:
    key: bytes
    value: bytes
    # the photo it is a copy of; None for the deliberately broken ones
    source: str | None


def photo_stream(
    count: int, bad_every: int = 0, seed: int = 0, photos: list[Photo] | None = None, prefix: str = "photo"
) -> Iterator[PhotoMessage]:
    """``count`` augmented copies of the photos in turn; every ``bad_every``-th one (if > 0) broken:
    a JPEG cut short, bytes that are no image, or an empty value."""
    photos = photos if photos is not None else natural_photos()
    if not photos:
        raise ConfigError("no photos found for the photo stream")
    rng = np.random.default_rng(seed)
    opened = [p.open() for p in photos]
    for i in range(count):
        key = f"{prefix}-{i:06d}".encode()
        if bad_every and i % bad_every == bad_every - 1:
            kind = (i // bad_every) % 3
            jpeg = encode(augment(opened[i % len(opened)], rng), "JPEG", 85)
            value = jpeg[: len(jpeg) // 8] if kind == 0 else (b"not an image at all" if kind == 1 else b"")
            yield PhotoMessage(key, value, None)
            continue
        k = i % len(photos)
        fmt = FORMATS[int(rng.integers(0, len(FORMATS)))]
        quality = int(rng.choice((60, 75, 90)))
        yield PhotoMessage(key, encode(augment(opened[k], rng), fmt, quality), photos[k].name)
