"""Sample traffic for the demo, per modality: mostly good messages, a few bad ones, no downloads.

Images are copies of real photos and sentences come in paraphrase groups, so what the pipeline
writes can be scored for meaning (``local.quality``), not only counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from embedstream.config import Settings
from embedstream.local import pipelines
from embedstream.local.samples.paraphrases import PARAPHRASES
from embedstream.local.samples.photos import photo_stream

Message = tuple[bytes, bytes]

# Text the worker must refuse: bytes that are not UTF-8, and a message of nothing but spaces.
BAD_TEXTS = (b"\xff\xfe not utf-8", b"   ")


@dataclass
class DemoTraffic:
    modality: str
    settings: Settings
    messages: list[Message]
    # Window key -> injected anomaly, for the time-series precision/recall line.
    labels: dict[bytes, bool] = field(default_factory=dict)
    # Key -> what it should land near (the photo it is a copy of, the fact a sentence states), for
    # the retrieval line; keys left out are not scored (bad messages, repeats of a sentence).
    groups: dict[bytes, str] = field(default_factory=dict)
    # Keys of the messages made bad on purpose: the worker must dead-letter each of them.
    bad_keys: list[bytes] = field(default_factory=list)


def image_traffic(base: Settings, count: int, bad_every: int, seed: int = 0, unusual: int = 0) -> DemoTraffic:
    """Augmented copies of real photos (``local.samples.photos``), every ``bad_every``-th one broken; then
    ``unusual`` images that are no photographs (textures, drawings, flat, noise and stripe images), labelled
    as anomalies for the detector's line."""
    traffic = DemoTraffic("image", pipelines.image_settings(base), [])
    for m in photo_stream(count, bad_every=bad_every, seed=seed, prefix="demo"):
        traffic.messages.append((m.key, m.value))
        if m.source is None:
            traffic.bad_keys.append(m.key)
        else:
            traffic.groups[m.key] = m.source
            traffic.labels[m.key] = False
    if unusual:
        import numpy as np

        from embedstream.local.samples.ood import ood_images

        images, _ = ood_images(np.random.default_rng(seed + 7), copies=max(1, -(-unusual // 17)))
        for i, value in enumerate(images[:unusual]):
            key = f"demo-unusual-{i:04d}".encode()
            traffic.messages.append((key, value))
            traffic.labels[key] = True
    return traffic


def fit_image_detector(settings: Settings, workdir: Path, photos: int = 125, seed: int = 1) -> Settings:
    """``settings`` with an anomaly detector fitted on copies of the stream's photos (another seed: the
    deployment's normal traffic of an earlier day), in-process with the encoder export serves."""
    from embedstream.training.detector import InProcessEncoder, Reference, fit_and_save

    reference = list(photo_stream(photos, bad_every=0, seed=seed, prefix="reference"))
    encoder = InProcessEncoder(settings)
    emb = encoder.embed([m.value for m in reference], batch_size=settings.batch.max_size)
    source = {"demo": f"{photos} copies of the photo stream's photos, seed {seed}"}
    path, _ = fit_and_save(
        Reference(emb, source),
        encoder.describe(),
        workdir / "weights" / "detector-image.safetensors",
        components=8,
        groups=[m.source for m in reference],
    )
    data = settings.model_dump()
    data["encoder"]["detector"] = str(path)
    return Settings(**data)


def sentence_order() -> list[tuple[int, str]]:
    """(group, sentence) with the groups' first sentences first, then their second ones, and so on:
    a short stream still holds pairs of paraphrases, and the groups it has not reached yet stay
    out rather than leaving half of them without a partner."""
    longest = max(len(g) for g in PARAPHRASES)
    return [(gi, g[j]) for j in range(longest) for gi, g in enumerate(PARAPHRASES) if j < len(g)]


def text_traffic(base: Settings, count: int, bad_every: int) -> DemoTraffic:
    """Sentences from hand-written paraphrase groups, in turn and again once all have been sent;
    every ``bad_every``-th message (if > 0) bad instead."""
    traffic = DemoTraffic("text", pipelines.text_settings(base), [])
    order = sentence_order()
    good = 0
    for i in range(count):
        key = f"text-{i:06d}".encode()
        if bad_every and i % bad_every == bad_every - 1:
            traffic.messages.append((key, BAD_TEXTS[(i // bad_every) % len(BAD_TEXTS)]))
            traffic.bad_keys.append(key)
            continue
        group, sentence = order[good % len(order)]
        # a repeat of a sentence would be its own perfect neighbour: only first sends are scored
        if good < len(order):
            traffic.groups[key] = f"fact-{group:02d}"
        good += 1
        traffic.messages.append((key, sentence.encode()))
    return traffic


def timeseries_traffic(base: Settings, windows: int, workdir: Path) -> DemoTraffic:
    """Trains the autoencoder on generated normal data (seconds), then streams labelled windows."""
    from embedstream.training import synthetic

    settings = pipelines.timeseries_settings(base, workdir)
    signal = synthetic.labelled_signal(windows, 32, seed=21)
    messages: list[Message] = []
    labels: dict[bytes, bool] = {}
    for i, w in enumerate(signal.windows()):
        key = f"window-{i:05d}".encode()
        labels[key] = bool(signal.labels[i])
        start = synthetic.START_MS + i * 32 * synthetic.STEP_MS
        doc = {"series_id": "plant-7", "values": w.tolist(), "start_ms": start, "end_ms": start + 31 * 1000}
        messages.append((key, json.dumps(doc).encode()))
    bad = {
        b"window-bad-nan": {"series_id": "plant-7", "values": [[float("nan")] * 3] * 32},
        b"window-bad-shape": {"series_id": "plant-7", "values": [[1.0, 2.0]] * 32},
    }
    messages += [(key, json.dumps(doc).encode()) for key, doc in bad.items()]
    return DemoTraffic("timeseries", settings, messages, labels, bad_keys=list(bad))
