"""The durable broker's storage settings: what Tansu is told, and the checks that name a wrong setting.

The checks against a running storage server (bucket missing, a broker that cannot use its storage)
are in tests/faults/test_durable_faults.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from embedstream.local.stack.process import free_port
from embedstream.local.stack.storage import LocalStorage, S3Location, StorageError, storage_binary


def test_tansu_gets_the_endpoint_http_permission_and_credentials():
    env = S3Location("http://127.0.0.1:9000", bucket="logs").env()
    assert env["AWS_ENDPOINT"] == env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["AWS_ALLOW_HTTP"] == "true"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"] and env["AWS_DEFAULT_REGION"]
    assert S3Location("http://127.0.0.1:9000", bucket="logs").storage_engine == "s3://logs/"


def test_plain_http_without_permission_is_refused_before_anything_starts():
    location = S3Location(f"http://127.0.0.1:{free_port()}", allow_http=False)
    with pytest.raises(StorageError, match="HTTP is not allowed"):
        location.check()


def test_an_endpoint_nobody_listens_on_is_named_unreachable():
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=f"unreachable at {endpoint}"):
        S3Location(endpoint).check(timeout_s=1.0)


def test_an_endpoint_that_is_not_a_url_is_refused():
    with pytest.raises(StorageError, match="not an http"):
        dataclasses.replace(S3Location("http://x"), endpoint="127.0.0.1:9000").check()


def test_the_storage_server_opens_only_loopback_ports_each_named(tmp_path: Path):
    try:
        storage_binary()
    except Exception:
        pytest.skip("no weed binary (the local extra) installed")
    storage = LocalStorage(tmp_path)
    argv = storage._proc.argv
    assert "-ip=127.0.0.1" in argv and "-ip.bind=127.0.0.1" in argv
    # Every listening component's port is set, so none lands on a default another stack might hold.
    named = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("-") and "port" in a}
    assert {"s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc"} <= named
    assert {"filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc"} <= named
    assert "-webdav=false" in argv and "-master.telemetry=false" in argv
    assert len(set(storage.ports.values())) == len(storage.ports)
    assert storage.location.endpoint == f"http://127.0.0.1:{storage.s3_port}"
    assert storage.data_dir == tmp_path / "storage"
