"""The by-reference bench stage: the same images inline and as ``s3://`` references, through one worker each.

The images are the bench's photo stream (augmented copies of real photos); as references they lie
in the local S3 server (SeaweedFS, as ``up --durable`` runs it). Each mode is a backlog drained by a
worker of its own on the same embedded stack; its throughput is the rows over the span between the
broker timestamps of the first and the last output message, so start-up and group joins are left
out. The figure to read is the ratio: by reference / inline, where the fetches overlap inference.

    .venv/bin/python -m embedstream.local.bench.reference_stage --count 300

``by_reference(stack, settings, messages, workdir)`` is the stage itself, for the bench table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from embedstream.config import Settings, load_settings
from embedstream.kafka_io import ensure_topics
from embedstream.local.readback import TopicReader
from embedstream.local.stack.stack import LocalStack
from embedstream.local.stack.storage import LocalStorage
from embedstream.local.stack.worker_process import WorkerProcess

BUCKET = "bench-images"


@dataclass(frozen=True)
class ModeResult:
    mode: str
    rows: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _topics(settings: Settings, name: str) -> Settings:
    k = settings.kafka
    kafka = k.model_copy(
        update={"input_topic": f"{name}-in", "output_topic": f"{name}-out", "dead_letter_topic": f"{name}-dlq",
                "group_id": f"{name}-group", "transactional_id": None}
    )  # fmt: skip
    ensure_topics(kafka, {kafka.input_topic: 4, kafka.output_topic: 4, kafka.dead_letter_topic: 1})
    return settings.model_copy(update={"kafka": kafka})


def drain(settings: Settings, messages: Sequence[tuple[bytes, bytes]], workdir: Path, name: str) -> ModeResult:
    """A backlog of ``messages`` through one worker process; rows over the first-to-last output span."""
    from embedstream.local.bench.stages import produce_burst

    produce_burst(settings.kafka, settings.kafka.input_topic, list(messages), time.time)
    worker = WorkerProcess(settings, workdir, name).start()
    reader = TopicReader(settings.kafka)
    try:
        deadline = time.monotonic() + 600
        while reader.result.rows + len(reader.result.dead_letters) < len(messages) and time.monotonic() < deadline:
            reader.poll(0.3)
        stamps = sorted(ts for ts, _ in reader.result.output_times)
        first_rows = next(t.num_rows for ts, t in reader.result.output_times if ts == stamps[0])
        span = (stamps[-1] - stamps[0]) / 1000
        return ModeResult(name, reader.result.rows - first_rows, span)
    finally:
        reader.close()
        worker.terminate()


def by_reference(
    stack: LocalStack, settings: Settings, messages: Sequence[tuple[bytes, bytes]], workdir: Path
) -> tuple[ModeResult, ModeResult]:
    """Inline, then the same images by reference from a local S3 server started here."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    storage = LocalStorage(workdir / "objects", bucket=BUCKET).start()
    try:
        s3 = boto3.session.Session().client(
            "s3", endpoint_url=storage.location.endpoint, region_name="us-east-1",
            config=Config(signature_version=UNSIGNED),
        )  # fmt: skip
        refs = []
        for key, value in messages:
            s3.put_object(Bucket=BUCKET, Key=key.decode(), Body=value)
            refs.append((key, f"s3://{BUCKET}/{key.decode()}".encode()))
        inline = drain(_topics(settings, "bench-inline"), messages, workdir, "bench-inline")
        fetch = load_settings(
            fetch={"enabled": True, "allowed_buckets": [BUCKET], "s3_endpoint_url": storage.location.endpoint,
                   "s3_region": "us-east-1"}
        ).fetch  # fmt: skip
        referenced = _topics(settings.model_copy(update={"fetch": fetch}), "bench-reference")
        # The local server takes any signature; boto3 must not look for an instance role (a metadata address).
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true"}
        with mock.patch.dict(os.environ, env):
            by_ref = drain(referenced, refs, workdir, "bench-reference")
    finally:
        storage.stop()
    return inline, by_ref


def main(argv: Sequence[str] | None = None) -> int:
    from embedstream.local.pipelines import image_settings
    from embedstream.local.samples.photos import photo_stream

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="images per mode")
    parser.add_argument("--arch", default=None, help="image encoder (default: the packaged tf_efficientnet_lite0)")
    args = parser.parse_args(argv)
    base = load_settings(health_port=None)
    settings = image_settings(base)
    if args.arch:
        settings = settings.model_copy(update={"encoder": settings.encoder.model_copy(update={"arch": args.arch})})
    messages = [(m.key, m.value) for m in photo_stream(args.count, prefix="ref")]
    workdir = Path(tempfile.mkdtemp(prefix="embedstream-refbench-"))
    with LocalStack(settings, workdir=workdir / "stack") as stack:
        inline, by_ref = by_reference(stack, stack.settings, messages, workdir)
    size = sum(len(v) for _, v in messages) / len(messages) / 1024
    print(f"{args.count} images, {size:.0f} KiB on average, model {stack.specs[0].name}")
    for r in (inline, by_ref):
        print(f"  {r.mode:<16} {r.per_s:8.1f} images/s  ({r.rows} rows in {r.seconds:.1f} s)")
    print(f"  by reference / inline: {by_ref.per_s / inline.per_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
