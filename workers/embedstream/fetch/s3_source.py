"""s3:// references through boto3: GetObject, its body streamed under the byte cap.

boto3 because its credential chain is the one AWS users configure (environment, shared config and
credentials files, web identity, container and instance roles), and it signs for any S3 API
(``fetch.s3_endpoint_url``: MinIO, SeaweedFS, Ceph...). boto3 does not log credentials, and nothing
here logs more than the bucket and key. Its own retries are off: ``fetcher`` retries timeouts and
5xx with its backoff, and holds the worker when the store does not answer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from embedstream.config import FetchSettings
from embedstream.fetch.budget import CHUNK, ByteBudget, read_capped
from embedstream.fetch.outcomes import Final, NoAnswer, Retry
from embedstream.fetch.references import Reference

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_FORBIDDEN = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


class S3Source:
    def __init__(self, settings: FetchSettings, client: Any | None = None) -> None:
        self._settings = settings
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:  # boto3 clients are thread-safe once built; building one is not
            if self._client is None:
                self._client = _make_client(self._settings)
            return self._client

    def fetch(self, ref: Reference, budget: ByteBudget) -> tuple[bytes, int]:
        from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

        deadline = time.monotonic() + self._settings.timeout_s
        cap = self._settings.max_object_bytes
        try:
            resp = self.client.get_object(Bucket=ref.bucket, Key=ref.key)
        except ClientError as exc:
            raise _classify(exc, ref) from None
        except BotoCoreError as exc:
            raise _transport(exc, ref) from None
        body = resp["Body"]
        size = int(resp.get("ContentLength") or 0)
        if size > cap:
            body.close()
            raise Final("fetch_too_large", f"{ref.uri}: {size} bytes > fetch.max_object_bytes {cap}")
        reserved = budget.reserve(size or cap)
        try:
            try:
                return read_capped(iter(lambda: body.read(CHUNK), b""), ref.uri, cap, deadline), reserved
            except ReadTimeoutError:
                raise Retry(f"{ref.uri}: read timed out", timeout=True) from None
            except (BotoCoreError, OSError) as exc:
                raise Retry(f"{ref.uri}: {type(exc).__name__} while reading", timeout=False) from None
        except BaseException:
            budget.release(reserved)
            raise
        finally:
            body.close()

    def answers(self, ref: Reference) -> bool:
        """Whether the store answers at all (any S3 answer counts, a 403 or 404 too): the outage probe."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=ref.bucket)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            return 0 < status < 500
        except BotoCoreError:
            return False
        return True

    def close(self) -> None:
        return None


def _make_client(settings: FetchSettings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.timeout_s,
        read_timeout=settings.timeout_s,
        retries={"total_max_attempts": 1},
        max_pool_connections=settings.concurrency,
        # A custom endpoint is one host for every bucket (MinIO, SeaweedFS); AWS itself takes its default.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config)


def _classify(exc: Any, ref: Reference) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    if code in _NOT_FOUND or status == 404:
        return Final("fetch_not_found", f"{ref.uri}: {code or status}")
    if code in _FORBIDDEN or status in (401, 403):
        return Final("fetch_forbidden", f"{ref.uri}: {code or status}")
    if status == 429 or status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
        return Retry(f"{ref.uri}: {code or status}", timeout=code == "RequestTimeout")
    return Final("fetch_failed", f"{ref.uri}: {code or status}")


def _transport(exc: Exception, ref: Reference) -> Exception:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    if isinstance(exc, ReadTimeoutError):
        return Retry(f"{ref.uri}: read timed out", timeout=True)
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return NoAnswer(f"the S3 endpoint did not answer for {ref.uri}: {type(exc).__name__}")
    if isinstance(exc, NoCredentialsError):
        return NoAnswer("no AWS credentials found (environment, shared files or an instance role)")
    return Retry(f"{ref.uri}: {type(exc).__name__}", timeout=False)
