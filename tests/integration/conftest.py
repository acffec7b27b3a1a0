"""Session fixtures: one real Tansu broker and one real CPU Triton, started here, stopped at the end.

Each test gets its own topics and consumer group on that stack, so tests do not see each other.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from embedstream.config import Settings, load_settings
from embedstream.encoders import get_family
from embedstream.kafka_io import ensure_topics
from embedstream.runtime.stack import LocalStack

ARCH = "mobilenetv3_small_100"
_counter = itertools.count()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Seeded weights saved as safetensors: the export and the in-process reference load the same file."""
    import timm

    torch.manual_seed(7)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / f"{ARCH}.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def stack(tmp_path_factory, checkpoint) -> Iterator[LocalStack]:
    settings = load_settings(encoder={"arch": ARCH, "weights": str(checkpoint)})
    workdir = tmp_path_factory.mktemp("stack")
    with LocalStack(settings, workdir=workdir) as running:
        yield running


@dataclass
class Lane:
    """One test's private topics and group on the shared stack."""

    settings: Settings
    workdir: Path

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka.bootstrap_servers


@pytest.fixture
def lane(stack, tmp_path, request) -> Lane:
    n = f"{request.node.name[:40]}-{next(_counter)}-{os.getpid()}".replace("[", "-").replace("]", "")
    base = stack.settings.model_dump()
    base["kafka"].update(
        input_topic=f"in-{n}", output_topic=f"out-{n}", dead_letter_topic=f"dlq-{n}", group_id=f"g-{n}"
    )
    settings = Settings(**base)
    k = settings.kafka
    ensure_topics(k, {k.input_topic: 3, k.output_topic: 3, k.dead_letter_topic: 1})
    return Lane(settings, tmp_path)


@pytest.fixture(scope="session")
def reference_model(stack):
    """The bare encoder in-process, with the weights Triton serves."""
    return get_family("cnn").build(stack.base_settings.encoder)
