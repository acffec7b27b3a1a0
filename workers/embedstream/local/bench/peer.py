"""The naive single-process peer: what a user would hand-write instead of running the pipeline.

One process, one kafka-python consumer in a group of its own on the modality's input topic; each
poll of up to ``batch.max_size`` records is decoded the way a user would (images: PIL and timm's
own transform for the served architecture; text: the model's tokenizer with padding; time series:
the window as float32), run through the same encoder in-process with torch, written as one message
per batch (the embedding rows as raw little-endian float32 bytes, no schema), and committed once the
producer has flushed it, so it gives the same at-least-once guarantee as the pipeline.

Its throughput is the floor the pipeline's design has to beat: the bench prints pipeline / peer.
The strongest peer (``onnx_embedder``) is the same loop with what a careful user would take
instead: the worker's own decode and the served ONNX file in ONNX Runtime; the bench prints
pipeline / the better of the two peers.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from embedstream.config import Settings
from embedstream.encoders import get_family
from embedstream.kafka_io import make_consumer, make_writer
from embedstream.local.bench.report import StageResult
from embedstream.service import encoder_spec

Clock = Callable[[], float]
Progress = Callable[[int], None]
# The model's inputs for one batch of raw message values.
Decoder = Callable[[Sequence[bytes]], tuple[torch.Tensor, ...]]
TIMEOUT_S = 600.0


def peer_settings(settings: Settings, topics: tuple[str, str]) -> Settings:
    """The pipeline's settings on the peer's own topics and group, reading its topic from the start."""
    kafka = settings.kafka.model_copy(
        update={
            "input_topic": topics[0],
            "output_topic": topics[1],
            "group_id": f"embedstream-bench-peer-{encoder_spec(settings).modality}",
            "auto_offset_reset": "earliest",
        }
    )
    return settings.model_copy(update={"kafka": kafka})


def _image_peer(module: torch.nn.Module) -> tuple[torch.nn.Module, Decoder]:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    # The served module wraps the timm model to take uint8 pixels; a user calls the timm model itself
    # on timm's own float transform (resize, centre crop, normalise).
    backbone: torch.nn.Module = getattr(module, "backbone", module)
    transform = create_transform(**resolve_data_config({}, model=backbone))

    def decode(values: Sequence[bytes]) -> tuple[torch.Tensor, ...]:
        return (torch.stack([transform(Image.open(io.BytesIO(v)).convert("RGB")) for v in values]),)

    return backbone, decode


def _text_peer(module: torch.nn.Module, settings: Settings) -> tuple[torch.nn.Module, Decoder]:
    from transformers import AutoTokenizer

    spec = encoder_spec(settings)
    tokenizer = AutoTokenizer.from_pretrained(
        str(spec.extra["tokenizer"]), local_files_only=settings.encoder.weights != "pretrained", use_fast=True
    )
    max_length = int(spec.extra["max_length"])

    def decode(values: Sequence[bytes]) -> tuple[torch.Tensor, ...]:
        texts = [v.decode("utf-8") for v in values]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    return module, decode


def _window_peer(module: torch.nn.Module) -> tuple[torch.nn.Module, Decoder]:
    def decode(values: Sequence[bytes]) -> tuple[torch.Tensor, ...]:
        windows = [np.asarray(orjson.loads(v)["values"], dtype=np.float32) for v in values]
        return (torch.from_numpy(np.stack(windows)),)

    return module, decode


def build_peer(settings: Settings) -> tuple[torch.nn.Module, Decoder]:
    """The in-process model a user would call and the decoder of raw values into its inputs."""
    module = get_family(settings.encoder.family).build(settings.encoder).eval()
    modality = encoder_spec(settings).modality
    if modality == "image":
        return _image_peer(module)
    if modality == "text":
        return _text_peer(module, settings)
    return _window_peer(module)


def embed_batch(model: torch.nn.Module, decode: Decoder, values: Sequence[bytes]) -> bytes:
    """One output message: the batch's embedding rows (the model's first output) as float32 bytes."""
    with torch.inference_mode():
        out = model(*decode(values))
    first = out[0] if isinstance(out, tuple) else out
    return first.float().contiguous().numpy().tobytes()


Embed = Callable[[Sequence[bytes]], bytes]


def run_peer(settings: Settings, count: int, clock: Clock, progress: Progress) -> StageResult:
    """The naive peer: the user's own decode and the torch model, in one process (see the module)."""
    model, decode = build_peer(settings)
    res = consume_embed_produce(settings, count, lambda values: embed_batch(model, decode, values), clock, progress)
    res.extra["torch_threads"] = torch.get_num_threads()
    return res


def onnx_embedder(settings: Settings, model_file: Path) -> Embed:
    """The strongest hand-written peer's batch step: the worker's own decode for the modality (its
    decode, prepare and stack: image draft-mode JPEG decode and resize, the fast tokenizer, windows
    as float32), then the served ONNX file in ONNX Runtime on every core, no server in between."""
    from embedstream.local.bench.served import OnnxModel
    from embedstream.modalities import modality_for
    from embedstream.records import BadRecord, Deferred, SourceMessage

    spec = encoder_spec(settings)
    modality = modality_for(spec, settings)
    model = OnnxModel(model_file, spec, os.cpu_count() or 1)
    name = spec.embedding_output.name

    def embed(values: Sequence[bytes]) -> bytes:
        decoded = modality.decode_many([SourceMessage("peer", 0, i, None, v, 0) for i, v in enumerate(values)])
        items = [d.item if isinstance(d, Deferred) else d for d in decoded]
        good = [it for it in items if it is not None and not isinstance(it, BadRecord)]
        ready = [it for it in modality.prepare(good) if not isinstance(it, BadRecord)]
        if not ready:
            return b""
        out = model.infer(modality.stack(ready))[name]
        return np.ascontiguousarray(out, dtype=np.float32).tobytes()

    return embed


def consume_embed_produce(
    settings: Settings, count: int, embed: Embed, clock: Clock, progress: Progress
) -> StageResult:
    """Consume ``count`` messages already on the peer's input topic: embed each poll, produce, commit.

    Timed from the first poll that returns records (the group join before it is start-up, as the
    pipeline stages also leave it out) to the commit of the last batch.
    """
    k = settings.kafka
    consumer = make_consumer(k, "embedstream-bench-peer")
    producer = make_writer(k, client_id="embedstream-bench-peer-out")
    consumer.subscribe([k.input_topic])
    size = settings.batch.max_size
    done = batches = 0
    start: float | None = None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while done < count:
            polled = consumer.poll(timeout_ms=500, max_records=size)
            values = [rec.value for records in polled.values() for rec in records]
            if not values:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"peer embedded {done} of {count} messages in {TIMEOUT_S:.0f} s")
                continue
            if start is None:
                # The first batch once more outside the clock: a runtime's first call pays one-off
                # allocations and kernel selection, which the served model paid before its stages.
                embed(values)
                start = clock()
            producer.send(k.output_topic, value=embed(values))
            producer.flush()
            consumer.commit()
            done += len(values)
            batches += 1
            progress(len(values))
        seconds = clock() - (start if start is not None else clock())
    finally:
        consumer.close()
        producer.close()
    extra: dict[str, Any] = {
        "batches": batches,
        "mean_batch": done / batches if batches else 0.0,
        "output": "raw float32 rows, one message per batch",
    }
    return StageResult(done, seconds, extra)
