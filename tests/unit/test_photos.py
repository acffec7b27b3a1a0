"""The photo stream: real photos from installed wheels, varied copies, and broken ones the worker refuses."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from embedstream.config import EncoderSettings, ImageLimits
from embedstream.encoders import get_family
from embedstream.local.samples import photos
from embedstream.modalities.image import DecodedImage, decode_image
from embedstream.records import BadRecord, SourceMessage


@pytest.fixture(scope="module")
def stream() -> list[photos.PhotoMessage]:
    return list(photos.photo_stream(80, bad_every=20, seed=3))


def test_the_photo_set_is_found_in_the_installed_wheels():
    found = photos.natural_photos()
    assert len(found) == 20 + len(photos.SCIKIT_IMAGE_PHOTOS)
    assert len({p.name for p in found}) == len(found)
    assert all(p.open().size[0] >= 100 for p in found)


def test_every_scikit_image_licence_is_the_one_its_docstring_states():
    import skimage.data

    stated = {
        "astronaut": "public domain",
        "chelsea": "CC0",
        "coffee": "CC0",
        "rocket": "public domain",
        "hubble_deep_field": "public domain",
    }
    for file_name, licence in photos.SCIKIT_IMAGE_PHOTOS.items():
        name = file_name.rsplit(".", 1)[0]
        doc = re.sub(r"\s+", " ", getattr(skimage.data, name).__doc__)
        assert stated[name] in doc, name
        assert licence.startswith(stated[name]), name


def test_copies_vary_in_format_size_and_pixels(stream):
    good = [m for m in stream if m.source is not None]
    formats, sizes = Counter(), set()
    for m in good:
        with Image.open(io.BytesIO(m.value)) as img:
            formats[img.format] += 1
            sizes.add(max(img.size))
    assert set(formats) == {"JPEG", "PNG", "WEBP"}
    assert len(sizes) >= 5
    # no two copies are the same bytes
    assert len({m.value for m in good}) == len(good)


def test_every_photo_gets_at_least_two_copies_even_with_bad_ones_in_between(stream):
    copies = Counter(m.source for m in stream if m.source is not None)
    assert set(copies) == {p.name for p in photos.natural_photos()}
    assert min(copies.values()) >= 2 and max(copies.values()) - min(copies.values()) <= 1


def test_the_stream_is_reproducible():
    a = [m.value for m in photos.photo_stream(8, seed=5)]
    assert a == [m.value for m in photos.photo_stream(8, seed=5)]
    assert a != [m.value for m in photos.photo_stream(8, seed=6)]


def test_the_worker_decodes_every_copy_and_refuses_every_broken_one(stream):
    spec = get_family("cnn").describe(EncoderSettings(family="cnn", arch="tf_efficientnet_lite0"))
    assert spec.preprocessing is not None
    bad_reasons = Counter()
    for i, m in enumerate(stream):
        got = decode_image(SourceMessage("images", 0, i, m.key, m.value, 0), spec.preprocessing, ImageLimits())
        if m.source is None:
            assert isinstance(got, BadRecord), m.key
            bad_reasons[got.reason] += 1
        else:
            assert isinstance(got, DecodedImage), m.key
    # 4 broken ones, the three kinds in turn: truncated JPEGs and junk bytes are undecodable
    assert bad_reasons == {"undecodable": 3, "empty": 1}


def test_each_kind_of_broken_message_fails_decode():
    spec = get_family("cnn").describe(EncoderSettings(family="cnn", arch="tf_efficientnet_lite0"))
    assert spec.preprocessing is not None
    img = photos.natural_photos()[0].open()
    for kind in photos.BAD_KINDS:
        value = photos.broken(kind, img, np.random.default_rng(0))
        got = decode_image(SourceMessage("images", 0, 0, b"k", value, 0), spec.preprocessing, ImageLimits())
        assert isinstance(got, BadRecord), kind
