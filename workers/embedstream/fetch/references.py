"""A reference read and checked against the allow-lists before anything is resolved or sent."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from embedstream.config import FetchSettings
from embedstream.fetch.guard import Refused

MAX_REFERENCE_CHARS = 2048
# S3's bucket naming rules (3-63 of lowercase letters, digits, dots and hyphens), so a bucket never
# becomes a host name of the producer's choosing under virtual-hosted addressing.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SCHEMES = (b"s3://", b"http://", b"https://")


class Malformed(Exception):
    """Not a reference that can be read (dead letter: fetch_failed)."""


@dataclass(frozen=True)
class Reference:
    uri: str
    scheme: str
    host: str = ""  # http(s)
    port: int = 0
    bucket: str = ""  # s3
    key: str = ""


def looks_like_reference(value: bytes) -> bool:
    """A raw message value that is a reference rather than image bytes (no image format starts like this)."""
    return value[:8].lower().startswith(_SCHEMES) and len(value) <= MAX_REFERENCE_CHARS


def parse(uri: str) -> Reference:
    if len(uri) > MAX_REFERENCE_CHARS or any(ch.isspace() or ord(ch) < 32 for ch in uri):
        raise Malformed("reference is too long or holds whitespace or control characters")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        key = unquote(parts.path.lstrip("/"))
        if not parts.netloc or not key:
            raise Malformed(f"{uri!r} is not s3://bucket/key")
        return Reference(uri, scheme, bucket=parts.netloc, key=key)
    if scheme in ("http", "https"):
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise Malformed(f"{uri!r}: {exc}") from None
        if not parts.hostname or parts.username or parts.password:
            raise Malformed(f"{uri!r} has no host, or carries credentials")
        return Reference(uri, scheme, host=parts.hostname.lower(), port=port)
    raise Malformed(f"{uri!r} is not an s3://, http:// or https:// reference")


def check_allowed(ref: Reference, settings: FetchSettings) -> None:
    """Raise Refused when the scheme, host or bucket is not on the allow-lists."""
    if not settings.enabled:
        raise Refused("references are not fetched here (fetch.enabled is false)")
    if ref.scheme not in settings.allowed_schemes:
        raise Refused(f"scheme {ref.scheme!r} is not in fetch.allowed_schemes {list(settings.allowed_schemes)}")
    if ref.scheme == "s3":
        if not _BUCKET.match(ref.bucket) or ".." in ref.bucket:
            raise Refused(f"{ref.bucket!r} is not a valid S3 bucket name")
        if ref.bucket not in settings.allowed_buckets:
            raise Refused(f"bucket {ref.bucket!r} is not in fetch.allowed_buckets")
        return
    if not host_allowed(ref.host, settings.allowed_hosts, ref.port):
        raise Refused(f"host {ref.host!r} port {ref.port} is not in fetch.allowed_hosts")


def host_allowed(host: str, allowed: tuple[str, ...], port: int | None = None) -> bool:
    """Whether ``host`` (and ``port``, where an entry names one: ``images.example.com:8443``) is allowed."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        name, _, entry_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
        if entry_port and port is not None and int(entry_port) != port:
            continue
        if name.startswith(".") and (host.endswith(name) and len(host) > len(name)):
            return True
        if host == name:
            return True
    return False


def _has_port(entry: str) -> bool:
    """``host:port`` (an IPv6 literal has colons of its own: ``[::1]:8443`` or a bare ``::1``)."""
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isdigit() and (":" not in head or head.endswith("]"))
