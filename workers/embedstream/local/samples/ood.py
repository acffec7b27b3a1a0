"""Images no photo stream holds: other packages' photographs (unseen normal images) and
out-of-distribution ones (scikit-image's non-photographs, generated flat, noise and stripe images).

The detector study scores a detector on them, the demo streams a few as the anomalies it labels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from embedstream.local.samples.photos import _package_dir, augment

# scikit-image's bundled images that are not photographs of everyday scenes: textures, microscopy,
# retina scans, drawings and test charts.
OOD_SKIMAGE = (
    "brick.png", "grass.png", "gravel.png", "cell.png", "ihc.png", "retina.jpg", "microaneurysms.png",
    "chessboard_RGB.png", "text.png", "page.png", "logo.png", "horse.png", "phantom.png", "color.png",
)  # fmt: skip


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ood_images(rng: np.random.Generator, copies: int = 2) -> tuple[list[bytes], list[str]]:
    """Out-of-distribution images: scikit-image's non-photographs (a few crops each) and generated ones."""
    root = _package_dir("skimage", "pip install scikit-image") / "data"
    out, names = [], []
    for name in OOD_SKIMAGE:
        path = root / name
        if not path.is_file():
            continue
        with Image.open(path) as raw:
            img = raw.convert("RGB")
        for i in range(copies):
            out.append(_jpeg(augment(img, rng)))
            names.append(f"{Path(name).stem}-{i}")
    for i in range(copies * 3):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        out.append(_png(Image.new("RGB", (320, 240), colour)))
        names.append(f"flat-{i}")
        out.append(_png(Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))))
        names.append(f"noise-{i}")
        period = int(rng.integers(4, 40))
        stripes = ((np.arange(320) // period) % 2 * 255).astype(np.uint8)
        out.append(_png(Image.fromarray(np.tile(stripes, (240, 1)))))
        names.append(f"stripes-{i}")
    return out, names


# Photographs that ship in other packages than the photo stream's: the unseen normal images.
UNSEEN_PHOTOS = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/camera.png"),
)
# Near out-of-distribution: photographs, but of microscope slides and retinas, not everyday scenes.
NEAR_OOD = ("cell", "ihc", "retina", "microaneurysms")


def unseen_photos() -> list[Image.Image]:
    out = []
    for package, rel in UNSEEN_PHOTOS:
        path = _package_dir(package, f"pip install {package}") / rel
        if path.is_file():
            with Image.open(path) as raw:
                out.append(raw.convert("RGB"))
    return out
