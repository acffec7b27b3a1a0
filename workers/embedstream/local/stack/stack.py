"""The whole embedded stack for demos, tests and ``embedstream up``: broker + exported models + Triton.

Durable (``durable=True``), the broker keeps its log in a local S3 server whose data lives under
``workdir/storage``: a stack started again on the same work directory has every topic, record and
committed consumer offset of the last one.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from embedstream.config import EncoderSettings, Settings, load_settings
from embedstream.encoders import EncoderSpec
from embedstream.export import ExportTarget, export_model, local_cpu_target
from embedstream.export.cache import cache_dir, export_cached
from embedstream.kafka_io import ensure_topics
from embedstream.local.stack.broker import LocalBroker
from embedstream.local.stack.storage import LocalStorage
from embedstream.local.stack.triton import LocalTriton

log = logging.getLogger(__name__)


def _default_exporter() -> Callable[[EncoderSettings, Path, ExportTarget], EncoderSpec]:
    """``export_model``, through the export cache when ``EMBEDSTREAM_EXPORT_CACHE`` names one."""
    root = cache_dir()
    if root is None:
        return export_model
    root.mkdir(parents=True, exist_ok=True)
    return lambda settings, repo, target: export_cached(settings, repo, target, root, export_model)


class LocalStack:
    """Starts in order (broker, model export, Triton, topics) and stops in reverse, even half-started.

    ``settings`` is one worker configuration or several (one per modality/encoder): every encoder is
    exported into one model repository served by one Triton, and every pipeline's topics are created.
    """

    def __init__(
        self,
        settings: Settings | Sequence[Settings] | None = None,
        workdir: Path | None = None,
        partitions: int = 4,
        broker_port: int | None = None,
        triton_ports: tuple[int | None, int | None, int | None] = (None, None, None),
        export_target: ExportTarget | None = None,
        durable: bool = False,
        exporter: Callable[[EncoderSettings, Path, ExportTarget], EncoderSpec] | None = None,
    ) -> None:
        """``exporter`` replaces ``export_model`` (the GPU run traces TorchScript again on its device)."""
        if settings is None:
            settings = load_settings()
        self.pipelines: list[Settings] = [settings] if isinstance(settings, Settings) else list(settings)
        self.base_settings = self.pipelines[0]
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="embedstream-"))
        self.partitions = partitions
        self.storage = LocalStorage(self.workdir) if durable else None
        self.broker = LocalBroker(self.workdir, broker_port, self.storage.location if self.storage else None)
        self.model_repository = self.workdir / "models"
        self.triton: LocalTriton | None = None
        self._triton_ports = triton_ports
        self.specs: list[EncoderSpec] = []
        self.export_target = export_target or local_cpu_target()
        self._export = exporter or _default_exporter()

    def start(self) -> LocalStack:
        try:
            if self.storage is not None:
                self.storage.start()
            self.broker.start()
            exported: dict[str, EncoderSpec] = {}
            for pipeline in self.pipelines:
                spec = self._export(pipeline.encoder, self.model_repository, self.export_target)
                exported.setdefault(spec.name, spec)
            self.specs = list(exported.values())
            http, grpc, metrics = self._triton_ports
            self.triton = LocalTriton(self.workdir, self.model_repository, http, grpc, metrics).start()
            for pipeline in self.all_settings:
                k = pipeline.kafka
                topics = {k.input_topic: self.partitions, k.output_topic: self.partitions, k.dead_letter_topic: 1}
                ensure_topics(k, topics)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def settings(self) -> Settings:
        """The first pipeline's settings pointed at this stack's broker and Triton."""
        return self.local_settings(self.base_settings)

    @property
    def all_settings(self) -> list[Settings]:
        """Every pipeline's settings pointed at this stack's broker and Triton."""
        return [self.local_settings(p) for p in self.pipelines]

    def local_settings(self, settings: Settings) -> Settings:
        data = settings.model_dump()
        data["kafka"]["bootstrap_servers"] = self.broker.bootstrap
        if self.triton is not None:
            proto = settings.triton.protocol
            data["triton"]["url"] = self.triton.grpc_url if proto == "grpc" else self.triton.http_url
        return Settings(**data)

    def stop(self) -> None:
        if self.triton is not None:
            self.triton.stop()
        self.broker.stop()
        if self.storage is not None:
            self.storage.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
