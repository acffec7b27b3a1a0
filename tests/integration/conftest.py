"""Session fixtures: one real Tansu broker and one real CPU Triton, started here, stopped at the end.

Each test gets its own topics and consumer group on that stack, so tests do not see each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from embedstream.config import Settings, load_settings
from embedstream.encoders import get_family
from embedstream.local.stack.stack import LocalStack

from .helpers import private_topics

ARCH = "mobilenetv3_small_100"


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
    return Lane(private_topics(stack.settings, request.node.name, partitions=3), tmp_path)


@pytest.fixture(scope="session")
def reference_model(stack):
    """The bare encoder in-process, with the weights Triton serves."""
    return get_family("cnn").build(stack.base_settings.encoder)
