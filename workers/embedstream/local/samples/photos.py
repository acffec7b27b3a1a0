"""Real photos that ship inside PyPI packages, and a stream of augmented copies of them.

Two sources, read as files (neither package is imported):

- the 20 labeled ImageNet validation photos in the ``foolbox`` wheel, ``foolbox/data/
  imagenet_<n>_<class>.jpg`` (the class is an ImageNet-1k index); the package is MIT-licensed, the
  photos' copyright stays with their photographers (:data:`IMAGENET_LICENSE`);
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
from PIL import Image, ImageEnhance, ImageFilter

from embedstream.errors import ConfigError

# file name in skimage/data -> the terms its ``skimage.data`` docstring states. The stereo pair
# ``motorcycle_left.png`` (Middlebury 2014 benchmark) is left out: its docstring states no terms.
SCIKIT_IMAGE_PHOTOS: dict[str, str] = {
    "astronaut.png": "public domain (NASA; no known copyright restrictions)",
    "chelsea.png": "CC0 (photographer Stefan van der Walt)",
    "coffee.png": "CC0 (photographer Rachel Michetti; courtesy of Pikolo Espresso Bar)",
    "rocket.jpg": "public domain (SpaceX)",
    "hubble_deep_field.jpg": "public domain (NASA)",
}
# The wheel is MIT-licensed; the photos are ImageNet validation images, whose copyright stays with
# their photographers (ImageNet's terms: non-commercial research and education).
IMAGENET_LICENSE = "ImageNet validation photo, shipped in the foolbox wheel (MIT package)"


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
    """A copy a camera or an upload path could have made: crop, flip, small rotation, exposure and
    colour edits, sometimes black-and-white or soft, rescaled."""
    w, h = img.size
    scale = rng.uniform(0.5, 1.0)
    cw, ch = max(16, int(w * scale)), max(16, int(h * scale * rng.uniform(0.85, 1.15)))
    cw, ch = min(cw, w), min(ch, h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4:
        out = out.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=False)
    # exposure, contrast and saturation as phone edits and auto-white-balance change them: colour
    # statistics alone then no longer tell the copies of one photo apart from the others
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.7, 1.3)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.7, 1.3)))
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.1:
        out = out.convert("L").convert("RGB")
    if rng.random() < 0.15:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
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


BAD_KINDS = ("truncated_jpeg", "not_an_image", "empty")


def broken(kind: str, img: Image.Image, rng: np.random.Generator) -> bytes:
    """A message no decoder can turn into pixels, of the kinds uploads really produce."""
    if kind == "truncated_jpeg":
        # a JPEG cut off after its header: the decoder accepts the start, then runs out of data
        jpeg = encode(augment(img, rng), "JPEG", 85)
        return jpeg[: len(jpeg) // 8]
    if kind == "not_an_image":
        return b"not an image at all"
    if kind == "empty":
        return b""
    raise ValueError(f"unknown kind of broken message {kind!r}; kinds: {', '.join(BAD_KINDS)}")


def photo_stream(
    count: int, bad_every: int = 0, seed: int = 0, photos: list[Photo] | None = None, prefix: str = "photo"
) -> Iterator[PhotoMessage]:
    """``count`` messages: augmented copies of the photos in turn, every ``bad_every``-th one (if > 0)
    broken instead (the kinds of :data:`BAD_KINDS` in turn).

    The photos take turns over the good messages only, so every photo gets ``good // len(photos)``
    copies or one more: with at least two copies each, every copy has a sibling to be retrieved by.
    """
    photos = photos if photos is not None else natural_photos()
    if not photos:
        raise ConfigError("no photos found for the photo stream")
    rng = np.random.default_rng(seed)
    opened = [p.open() for p in photos]
    good = 0
    for i in range(count):
        key = f"{prefix}-{i:06d}".encode()
        if bad_every and i % bad_every == bad_every - 1:
            kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
            yield PhotoMessage(key, broken(kind, opened[i % len(opened)], rng), None)
            continue
        k = good % len(photos)
        good += 1
        fmt = FORMATS[int(rng.integers(0, len(FORMATS)))]
        quality = int(rng.choice((60, 75, 90)))
        yield PhotoMessage(key, encode(augment(opened[k], rng), fmt, quality), photos[k].name)
