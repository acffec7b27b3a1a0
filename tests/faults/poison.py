"""Bad input of every class the image path knows, mixed into good traffic at a given rate."""

from __future__ import annotations

import base64
import struct
import zlib

import orjson

from embedstream.config import ImageLimits
from embedstream.local.samples.generated import corrupt, encode, render, samples


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_payloads(limits: ImageLimits) -> dict[str, bytes]:
    """One message per dead-letter reason of the image path."""
    return {
        "empty": b"",
        "oversize": b"\xff\xd8" + b"\0" * (limits.max_message_bytes + 1),
        "invalid_envelope": orjson.dumps({"image": base64.b64encode(b"x").decode(), "surprise": 1}),
        "undecodable": corrupt(3),
        "unsupported_format": encode(render(1, (32, 32)), "GIF"),
        "decompression_bomb": _png_header(200_000, 200_000),
        # A good image, but pinned to a model no worker serves (see the header below).
        "unknown_model": encode(render(2, (64, 48)), "JPEG"),
    }


def poison_messages(total: int, rate: float, limits: ImageLimits) -> tuple[list[tuple], dict[bytes, str]]:
    """``total`` messages, ``rate`` of them bad, cycling through every class; returns them and key -> reason."""
    bad = list(bad_payloads(limits).items())
    every = max(1, round(1 / rate))
    good = iter(samples(total, prefix="mix"))
    messages: list[tuple] = []
    expected: dict[bytes, str] = {}
    for i in range(total):
        if i % every == every // 2:
            reason, value = bad[len(expected) % len(bad)]
            key = f"poison-{i:05d}-{reason}".encode()
            expected[key] = reason
            headers = [("embedstream.model", b"image-no-such-model:7")] if reason == "unknown_model" else []
            messages.append((key, value, headers))
        else:
            s = next(good)
            messages.append((s.key, s.value))
    return messages, expected
