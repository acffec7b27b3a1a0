import io
import struct
import zlib

import numpy as np
import orjson
import pytest
from PIL import Image

from embedstream.config import ImageLimits
from embedstream.encoders import ImagePreprocessing
from embedstream.local.samples.generated import corrupt, encode, render
from embedstream.modalities.image import DecodedImage, decode_image
from embedstream.records import BadRecord, SourceMessage

PREP = ImagePreprocessing(
    height=32, width=32, resize_shorter_to=36, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
)


def msg(value: bytes, key: bytes | None = b"k1", headers=()) -> SourceMessage:
    return SourceMessage("images", 2, 17, key, value, 1_700_000_000_000, tuple(headers))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("size", [(40, 30), (30, 90), (640, 480)])
def test_decodes_each_format_and_size_to_model_input(fmt, size):
    out = decode_image(msg(encode(render(3, size), fmt)), PREP, ImageLimits())
    assert isinstance(out, DecodedImage)
    assert out.pixels.shape == (32, 32, 3) and out.pixels.dtype == np.uint8
    assert (out.source_width, out.source_height) == size
    assert out.id == "k1" and out.event_time_ms == 1_700_000_000_000


def test_center_crop_keeps_the_middle():
    # Left third red, middle green, right third blue: a centre crop of a wide image is mostly green.
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, :40, 0] = 255
    arr[:, 40:80, 1] = 255
    arr[:, 80:, 2] = 255
    out = decode_image(msg(encode(Image.fromarray(arr), "PNG")), PREP, ImageLimits())
    assert isinstance(out, DecodedImage)
    assert out.pixels[:, :, 1].mean() > 200 and out.pixels[:, :, 0].mean() < 30


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("value", "limits", "reason"),
    [
        (b"", ImageLimits(), "empty"),
        (b"\xff\xd8" + b"x" * 2000, ImageLimits(max_message_bytes=1000), "oversize"),
        (b"this is not an image at all", ImageLimits(), "undecodable"),
        (corrupt(1), ImageLimits(), "undecodable"),
        (_png_header_only(100_000, 100_000), ImageLimits(), "decompression_bomb"),
        (_png_header_only(20_000, 10), ImageLimits(max_side=10_000), "decompression_bomb"),
        (encode(render(1, (40, 40)), "GIF"), ImageLimits(), "unsupported_format"),
        (b'{"image": "!!!not base64"}', ImageLimits(), "invalid_envelope"),
    ],
)
def test_bad_input_becomes_a_bad_record_with_reason(value, limits, reason):
    out = decode_image(msg(value), PREP, limits)
    assert isinstance(out, BadRecord)
    assert out.reason == reason, out.message
    assert out.source.offset == 17


def test_bomb_is_rejected_before_pixels_are_decoded():
    # 100k x 100k RGB would need 30 GB; the guard reads only the header, so this is instant and small.
    out = decode_image(msg(_png_header_only(100_000, 100_000)), PREP, ImageLimits())
    assert isinstance(out, BadRecord) and out.reason == "decompression_bomb" and "pixels" in out.message


def test_json_envelope_carries_id_and_event_time():
    import base64

    img = encode(render(5, (50, 40)), "JPEG")
    value = orjson.dumps({"id": "cam-7/frame-9", "image": base64.b64encode(img).decode(), "event_time_ms": 42})
    out = decode_image(msg(value, headers=[("content-type", b"application/json")]), PREP, ImageLimits())
    assert isinstance(out, DecodedImage)
    assert out.id == "cam-7/frame-9" and out.event_time_ms == 42


def test_without_key_the_id_is_the_source_coordinates():
    out = decode_image(msg(encode(render(1, (40, 40)), "PNG"), key=None), PREP, ImageLimits())
    assert isinstance(out, DecodedImage) and out.id == "images/2@17"


def test_jpeg_draft_decoding_matches_full_decode_closely():
    # Draft mode decodes big JPEGs at reduced scale; the model input should barely change.
    data = encode(render(9, (1024, 768)), "JPEG")
    fast = decode_image(msg(data), PREP, ImageLimits())
    assert isinstance(fast, DecodedImage)
    full = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((48, 36), Image.Resampling.BICUBIC).crop((8, 2, 40, 34))
    )
    assert np.abs(fast.pixels.astype(int) - full.astype(int)).mean() < 8
