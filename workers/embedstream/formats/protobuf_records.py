"""Protobuf registry records without generated classes: the message type is built from the registry's schema.

confluent-kafka's ``ProtobufDeserializer`` takes the generated class of one message type. A worker
reads whatever its producers registered, so the class is made from the writer's schema (the
registry's serialized ``FileDescriptorProto`` and its references) the first time a schema id and
message index are seen, and a ``ProtobufDeserializer`` of that class decodes the record: the framing,
the message indexes and the payload are read by the reference implementation.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


class ProtobufRecords:
    """``(value, ctx) -> dict`` for any registered Protobuf message type."""

    def __init__(self, client: Any, conf: dict[str, Any]) -> None:
        from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
        from google.protobuf import empty_pb2

        self._client = client
        self._conf = dict(conf)
        # Reads schemas only: its helpers turn a registered schema into a descriptor pool.
        self._schemas = ProtobufDeserializer(empty_pb2.Empty, self._conf, client)
        self._typed: dict[tuple[int, tuple[int, ...]], Any] = {}

    def __call__(self, value: bytes, ctx: Any) -> dict[str, Any]:
        from confluent_kafka.schema_registry import dual_schema_id_deserializer
        from confluent_kafka.schema_registry.common.serde import SchemaId

        schema_id = SchemaId("PROTOBUF")
        dual_schema_id_deserializer(value, ctx, schema_id)
        key = (int(schema_id.id or 0), tuple(schema_id.message_indexes or [0]))
        deserializer = self._typed.get(key)
        if deserializer is None:
            deserializer = self._typed[key] = self._deserializer_for(key[0], list(key[1]), ctx)
        return message_to_dict(deserializer(value, ctx))

    def _deserializer_for(self, schema_id: int, indexes: list[int], ctx: Any) -> Any:
        from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
        from google.protobuf.message_factory import GetMessageClass

        subject = f"{ctx.topic}-value" if ctx is not None else None
        # The same lookup (id, subject, serialized) the deserializer makes, so the client's cache answers it.
        schema = self._client.get_schema(schema_id, subject, fmt="serialized")
        fd_proto, pool = self._schemas._get_parsed_schema(schema)
        desc = self._schemas._get_message_desc(pool, pool.FindFileByName(fd_proto.name), indexes)
        return ProtobufDeserializer(GetMessageClass(desc), self._conf, self._client)


_BYTES = FieldDescriptor.TYPE_BYTES
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def message_to_dict(msg: Message) -> dict[str, Any]:
    """Every field (unset scalars at their default, as proto3 reads them) as plain Python values.

    Not ``json_format.MessageToDict``: that writes 64-bit integers as strings and bytes as base64,
    and a timestamp or an image would no longer be what the producer sent.
    """
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = {k: _value(field.message_type.fields_by_name["value"], v) for k, v in value.items()}
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_value(field, v) for v in value]
        elif field.type == _MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == _MESSAGE:
        return message_to_dict(value)
    if field.type == _BYTES:
        return bytes(value)
    return value


__all__ = ["ProtobufRecords", "message_to_dict"]
