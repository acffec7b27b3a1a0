"""Sample traffic for the demo, per modality: mostly good messages, a few bad ones, no downloads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from embedstream.config import Settings
from embedstream.local import pipelines
from embedstream.local.samples import samples

Message = tuple[bytes, bytes]

_SUBJECTS = ("The pump", "A sensor", "The camera", "Our warehouse robot", "The night shift", "A delivery van")
_VERBS = ("reported", "flagged", "recorded", "missed", "repaired", "ignored")
_OBJECTS = ("a pressure spike", "a cracked lens", "late parcels", "an overheating motor", "a door left open")


@dataclass
class DemoTraffic:
    modality: str
    settings: Settings
    messages: list[Message]
    # Window key -> injected anomaly, for the time-series precision/recall line.
    labels: dict[bytes, bool] = field(default_factory=dict)


def image_traffic(base: Settings, count: int, bad_every: int) -> DemoTraffic:
    batch = [(s.key, s.value) for s in samples(count, bad_every=bad_every, prefix="demo")]
    return DemoTraffic("image", pipelines.image_settings(base), batch)


def text_traffic(base: Settings, count: int, bad_every: int) -> DemoTraffic:
    settings = pipelines.text_settings(base)
    messages: list[Message] = []
    for i in range(count):
        key = f"text-{i:06d}".encode()
        if bad_every and i % bad_every == bad_every - 1:
            messages.append((key, b"\xff\xfe not utf-8" if i % 2 else b"   "))
            continue
        sentence = f"{_SUBJECTS[i % 6]} {_VERBS[(i // 6) % 6]} {_OBJECTS[(i // 36) % 5]} at {i % 24:02d}:00."
        messages.append((key, sentence.encode()))
    return DemoTraffic("text", settings, messages)


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
    messages.append(
        (b"window-bad-nan", json.dumps({"series_id": "plant-7", "values": [[float("nan")] * 3] * 32}).encode())
    )
    messages.append((b"window-bad-shape", json.dumps({"series_id": "plant-7", "values": [[1.0, 2.0]] * 32}).encode()))
    return DemoTraffic("timeseries", settings, messages, labels)
