"""The dead-letter contract: the original bytes and key, plus headers saying why and from where.

Header names and reasons are listed in ``schemas/dead-letter.json``.
"""

from __future__ import annotations

from embedstream.records import BadRecord

HEADER_PREFIX = "embedstream.dlq."
REASON = HEADER_PREFIX + "reason"
ERROR_CLASS = HEADER_PREFIX + "error_class"
MESSAGE = HEADER_PREFIX + "message"
SOURCE_TOPIC = HEADER_PREFIX + "source_topic"
SOURCE_PARTITION = HEADER_PREFIX + "source_partition"
SOURCE_OFFSET = HEADER_PREFIX + "source_offset"
WORKER_ID = HEADER_PREFIX + "worker_id"
# Only when the original value was too large to re-publish: its size in bytes (the value is then empty).
VALUE_DROPPED = HEADER_PREFIX + "value_dropped"

MAX_MESSAGE_CHARS = 512


def dead_letter_headers(bad: BadRecord, worker_id: str) -> list[tuple[str, bytes]]:
    """Our headers first, then the original headers (kept so the message can be re-driven as it was)."""
    src = bad.source
    ours = [
        (REASON, bad.reason.encode()),
        (ERROR_CLASS, bad.error_class.encode()),
        (MESSAGE, bad.message[:MAX_MESSAGE_CHARS].encode("utf-8", "replace")),
        (SOURCE_TOPIC, src.topic.encode()),
        (SOURCE_PARTITION, str(src.partition).encode()),
        (SOURCE_OFFSET, str(src.offset).encode()),
        (WORKER_ID, worker_id.encode()),
    ]
    return ours + [(k, v) for k, v in src.headers if not k.startswith(HEADER_PREFIX)]
