"""What a modality declares besides its worker: its pipeline's defaults on the local stack and its columns.

The local stack, the Feast repository, the null encoder and the GPU run read these from the registry,
so adding a modality is adding its module, not editing a list in each of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class ModalityTopics:
    """A pipeline's Kafka names when it is not the base config's own."""

    input: str
    output: str
    dead_letter: str
    group_id: str

    @classmethod
    def named(cls, name: str, input_topic: str | None = None) -> ModalityTopics:
        """The stack's naming: ``embeddings.<name>``, ``deadletter.<name>`` and group ``embedstream-<name>``."""
        return cls(input_topic or name, f"embeddings.{name}", f"deadletter.{name}", f"embedstream-{name}")


@dataclass(frozen=True)
class ModalityDefaults:
    topics: ModalityTopics
    # Encoder families serving the modality; the first one's example inputs stand for all of them.
    families: tuple[str, ...]
    # Settings sections that belong to this modality's pipeline: a pipeline derived from another's
    # config starts from their defaults rather than inheriting limits sized for another input.
    sections: tuple[str, ...]
    # Encoder settings (over EncoderSettings' defaults) of the pipeline the local stack derives for it.
    encoder: Mapping[str, str] = field(default_factory=dict)
    # Its derived pipeline's batch (None: BatchSettings' default).
    batch_size: int | None = None
    # Whether its default encoder is a pretrained network with packaged weights: embeddings whose
    # neighbours mean something out of the box, and a model heavy enough to be worth a GPU. Otherwise
    # the local stack fits one on generated data, in windows of ``window`` points.
    pretrained: bool = True
    window: int | None = None
    # What one message is, in throughput figures.
    unit: str = "messages"
    # Columns some of its models add through outputs with a column; rows of a model without them hold null.
    model_columns: tuple[pa.Field, ...] = ()
    # What the bench holds the pipeline to against the strongest hand-written peer (pipeline / peer).
    bench_peer_target: float = 1.5
