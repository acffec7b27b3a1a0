"""Schema-registry records -> Python values, through confluent-kafka's own deserializers.

The wire format is Confluent's: magic byte 0, the schema id (4 bytes, big-endian), then the Avro,
Protobuf (after its message-index varints) or JSON payload. A schema is fetched once per schema id
(the registry client caches it); a record is then decoded locally. Every outcome is a value:

- ``Record``: the decoded record (dicts, lists, scalars; Avro and Protobuf ``bytes`` stay bytes);
- ``Refused``: bad input, dead-lettered with its reason (``not_registry_framed``, ``unknown_schema``,
  ``undecodable_record``);
- ``RegistryDown``: the registry did not answer (refused, timed out, 5xx, or refused our credentials):
  an outage, held and retried by the worker, never a dead letter.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedstream.errors import ConfigError

if TYPE_CHECKING:
    from embedstream.config import InputSettings, RegistrySettings

log = logging.getLogger(__name__)

MAGIC_BYTE = 0
HEADER_BYTES = 5  # magic byte + schema id


@dataclass(frozen=True)
class Record:
    schema_id: int
    value: Any


@dataclass(frozen=True)
class Refused:
    reason: str  # a records.Reason
    message: str
    error_class: str


@dataclass(frozen=True)
class RegistryDown:
    message: str


Decoded = Record | Refused | RegistryDown


def registry_client_config(registry: RegistrySettings) -> dict[str, Any]:
    """The confluent-kafka ``SchemaRegistryClient`` configuration of ``[input.registry]``.

    One try per request: a registry that does not answer is held and retried by the worker's outage
    handling, which backs off and keeps the stream's place, instead of inside the loop's thread.
    """
    conf: dict[str, Any] = {"url": registry.url, "timeout": registry.timeout_s, "max.retries": 0}
    if registry.username is not None and registry.password is not None:
        conf["basic.auth.user.info"] = f"{registry.username}:{registry.password.get_secret_value()}"
    if registry.bearer_token is not None:
        conf["bearer.auth.credentials.source"] = "STATIC"
        conf["bearer.auth.token"] = registry.bearer_token.get_secret_value()
        conf["bearer.auth.logical.cluster"] = registry.bearer_logical_cluster or ""
        conf["bearer.auth.identity.pool.id"] = registry.bearer_identity_pool or ""
    if registry.ssl_cafile is not None:
        conf["ssl.ca.location"] = str(registry.ssl_cafile)
    if registry.ssl_certfile is not None:
        conf["ssl.certificate.location"] = str(registry.ssl_certfile)
    if registry.ssl_keyfile is not None:
        conf["ssl.key.location"] = str(registry.ssl_keyfile)
    return conf


def make_client(registry: RegistrySettings) -> Any:
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError:
        raise ConfigError(
            "schema-registry input needs confluent-kafka's registry client: pip install 'embedstream[formats]'"
        ) from None
    try:
        return SchemaRegistryClient.new_client(registry_client_config(registry))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"input.registry: {exc}") from None


def schema_id_of(value: bytes) -> int | None:
    """The schema id of a registry-framed value; None when the value is not framed."""
    if len(value) < HEADER_BYTES or value[0] != MAGIC_BYTE:
        return None
    return int.from_bytes(value[1:HEADER_BYTES], "big")


class RecordDecoder:
    """One input format's deserializer over one registry client; call it with a value and its topic."""

    def __init__(self, settings: InputSettings, client: Any | None = None) -> None:
        from confluent_kafka.schema_registry import topic_subject_name_strategy

        self.format = settings.format
        self.client = client if client is not None else make_client(settings.registry)
        # The topic strategy names the subject from the topic alone: the default (associated) strategy
        # would ask the registry about every topic, and our lookups go by schema id anyway.
        self._conf = {"subject.name.strategy": topic_subject_name_strategy}
        self._deserializer = self._build()

    def _build(self) -> Any:
        if self.format == "avro":
            from confluent_kafka.schema_registry.avro import AvroDeserializer

            return AvroDeserializer(self.client, conf=self._conf)
        if self.format == "json_schema":
            from confluent_kafka.schema_registry.json_schema import JSONDeserializer

            return JSONDeserializer(None, schema_registry_client=self.client, conf=self._conf)
        if self.format == "protobuf":
            from embedstream.formats.protobuf_records import ProtobufRecords

            return ProtobufRecords(self.client, self._conf)
        raise ConfigError(f"input.format {self.format!r} is not a schema-registry format")

    def __call__(self, value: bytes, topic: str) -> Decoded:
        from confluent_kafka.serialization import MessageField, SerializationContext

        schema_id = schema_id_of(value)
        if schema_id is None:
            return Refused("not_registry_framed", _not_framed(value), "SerializationError")
        ctx = SerializationContext(topic, MessageField.VALUE)
        try:
            decoded = self._deserializer(value, ctx)
        except Exception as exc:
            return self._classify(exc, schema_id, ctx)
        return Record(schema_id, decoded)

    def ready(self) -> bool:
        """Whether the registry answers at all (the outage probe)."""
        try:
            self.client.get_subjects()
        except Exception as exc:
            return not _unreachable(exc)
        return True

    def _classify(self, exc: Exception, schema_id: int, ctx: Any) -> Decoded:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if isinstance(exc, SchemaRegistryError):
            status = exc.http_status_code
            if status == 404:
                return Refused("unknown_schema", f"schema id {schema_id} is not in the registry", type(exc).__name__)
            if status in (401, 403) or status == 429 or status >= 500 or status < 0:
                return RegistryDown(f"schema registry answered {status} for schema id {schema_id}: {exc.error_message}")
            return Refused("undecodable_record", f"registry refused schema id {schema_id}: {exc}", type(exc).__name__)
        if _unreachable(exc):
            return RegistryDown(
                f"schema registry did not answer for schema id {schema_id}: {type(exc).__name__}: {exc}"
            )
        other = self._other_format(schema_id, ctx)
        if other is not None:
            # A deserializer handed a schema of another format fails with whatever it tripped on
            # ("unhashable type: 'dict'", "Invalid base64-encoded string"): name the mismatch instead.
            expected = _FORMATS[self.format]
            why = f"schema id {schema_id} is of type {other}; input.format is {self.format} (type {expected})"
            return Refused("undecodable_record", why, type(exc).__name__)
        return Refused("undecodable_record", f"schema id {schema_id}: {_short(exc)}", type(exc).__name__)

    def _other_format(self, schema_id: int, ctx: Any) -> str | None:
        """The schema's type where it is not this decoder's format. Asked under the subject the deserializer
        used, so the client answers from the cache it filled: no second request for a schema id."""
        try:
            subject = self._conf["subject.name.strategy"](ctx, None)
            kind = (self.client.get_schema(schema_id, subject_name=subject).schema_type or "AVRO").upper()
        except Exception:
            return None
        return kind if kind != _FORMATS[self.format] else None


# input.format -> the registry's schemaType (Avro is the registry's default, often left out).
_FORMATS = {"avro": "AVRO", "protobuf": "PROTOBUF", "json_schema": "JSON"}


def _not_framed(value: bytes) -> str:
    if len(value) < HEADER_BYTES:
        return (
            f"not a schema-registry record: {len(value)} byte(s), fewer than the {HEADER_BYTES} of its frame "
            "(magic byte 0 and a 4-byte schema id)"
        )
    return f"not a schema-registry record: starts with 0x{value[0]:02x}, not magic byte 0 and a 4-byte schema id"


def _unreachable(exc: BaseException) -> bool:
    """A transport failure (refused, reset, timed out, name not found): the registry is away, not the record bad."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        status = exc.http_status_code
        return status in (401, 403, 429) or status >= 500 or status < 0
    return isinstance(exc, _transport_errors())


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """The registry client's HTTP library may be httpx or its successor httpx2, whichever is installed."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(found)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."
