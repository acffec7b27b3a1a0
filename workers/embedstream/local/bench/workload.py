"""Per modality: the real pipeline's settings, its null twin's, and the messages both get.

The traffic is the demo's (``demo_data``) without the deliberately bad messages, so every
message becomes exactly one output row and counts line up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from embedstream.config import Settings, load_settings
from embedstream.local.samples.traffic import Message, image_traffic, text_traffic, timeseries_traffic
from embedstream.modalities import registered
from embedstream.records import BadRecord, Deferred, SourceMessage
from embedstream.service import encoder_spec

MODALITIES = registered()
POINT_SERIES = 50  # series in the one-point-a-message traffic, each keyed to one partition


@dataclass
class Workload:
    modality: str
    settings: Settings
    null_settings: Settings
    messages: list[Message]
    # Time series only: observations, one point a message, that close exactly ``point_windows`` windows.
    points: list[Message] = field(default_factory=list)
    point_windows: int = 0

    @property
    def raw_topics(self) -> tuple[str, str]:
        return f"bench.raw.{self.modality}.in", f"bench.raw.{self.modality}.out"

    @property
    def peer_topics(self) -> tuple[str, str]:
        """The naive peer's input and output topics."""
        return f"bench.peer.{self.modality}.in", f"bench.peer.{self.modality}.out"


def null_twin(settings: Settings) -> Settings:
    """The same pipeline with the null encoder in place of the real one, on topics and a group of its own."""
    data = settings.model_dump(mode="json")
    enc = data["encoder"]
    m = encoder_spec(settings).modality
    data["encoder"] = {**enc, "family": "null", "arch": f"{enc['family']}/{enc['arch']}", "model_name": None}
    data["kafka"].update(
        input_topic=f"bench.null.{m}",
        output_topic=f"bench.null.embeddings.{m}",
        dead_letter_topic=f"bench.null.deadletter.{m}",
        group_id=f"embedstream-bench-null-{m}",
    )
    return load_settings(**data)


def build_workload(base: Settings, modality: str, count: int, workdir: Path) -> Workload:
    if modality == "image":
        traffic = image_traffic(base, count, bad_every=0)
    elif modality == "text":
        traffic = text_traffic(base, count, bad_every=0)
    else:
        traffic = timeseries_traffic(base, count, workdir)
    messages = [(k, v) for k, v in traffic.messages if not k.startswith(b"window-bad")]
    w = Workload(modality, traffic.settings, null_twin(traffic.settings), messages)
    if modality == "timeseries":
        w.points, w.point_windows = observation_traffic(traffic.settings, count)
    return w


def observation_traffic(settings: Settings, count: int) -> tuple[list[Message], int]:
    """At least ``count`` observations over ``POINT_SERIES`` series, keyed by series id as producers should.

    Each series gets a whole number of the model's windows, so the points close exactly that many
    windows (tumbling) and none is left open.
    """
    length, channels = encoder_spec(settings).inputs[0].dims
    per_series = length * max(1, -(-count // (POINT_SERIES * length)))
    points: list[Message] = []
    for t in range(per_series):
        for s in range(POINT_SERIES):
            values = [round(math.sin(0.1 * t + s + c), 4) for c in range(channels)]
            doc = {"series_id": f"points-{s:03d}", "timestamp_ms": 1_700_000_000_000 + t * 1000, "values": values}
            points.append((f"points-{s:03d}".encode(), orjson.dumps(doc)))
    return points, POINT_SERIES * per_series // length


def rekey(messages: Sequence[Message], prefix: str) -> list[Message]:
    """The same values under keys unique to one stage, so its rows are told apart on a shared output topic."""
    return [(f"{prefix}-{i:06d}".encode(), value) for i, (_key, value) in enumerate(messages)]


def preprocessed_batches(settings: Settings, messages: Sequence[Message]) -> list[tuple[np.ndarray, ...]]:
    """The model inputs the worker would send, in batches of ``batch.max_size``, decoded here once."""
    from embedstream.modalities import modality_for

    spec = encoder_spec(settings)
    modality = modality_for(spec, settings)
    items = []
    for i, (key, value) in enumerate(messages):
        got = modality.decode(SourceMessage("bench", 0, i, key, value, 0))
        if isinstance(got, Deferred):
            got = got.item
        if got is not None and not isinstance(got, BadRecord):
            items.append(got)
    size = settings.batch.max_size
    return [modality.stack(items[i : i + size]) for i in range(0, len(items), size)]
