"""The sample inputs a user asks for by name: as files, for the commands that take files (``train
detector --data``, ``search --image``), and as messages (``produce-samples``). All of them are made
from what ships in the wheels or generated here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from embedstream.local.samples.paraphrases import PARAPHRASES
from embedstream.local.samples.photos import natural_photos


def write_photos(folder: Path) -> int:
    """The 25 real photos (20 labeled ImageNet photos, 5 of scikit-image's), copied byte for byte."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = natural_photos()
    for photo in photos:
        shutil.copyfile(photo.path, folder / f"{photo.name}{photo.path.suffix.lower()}")
    return len(photos)


def write_sentences(path: Path) -> int:
    """Every sentence of the paraphrase groups, one per line, group after group."""
    sentences = [s for group in PARAPHRASES for s in group]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\n" for s in sentences), encoding="utf-8")
    return len(sentences)


MODALITIES = ("image", "text", "timeseries")


def sample_messages(modality: str, count: int, bad_every: int = 0) -> list[tuple[bytes, bytes]]:
    """``count`` (key, value) messages keyed ``sample-NNNNNN``: generated images (every ``bad_every``-th
    one corrupt), the paraphrase sentences in the demo's order, or 32 x 3 signal windows of the
    generated plant signal (the shape of the time-series model ``up`` and the demo train)."""
    if modality == "image":
        from embedstream.local.samples.generated import samples

        return [(s.key, s.value) for s in samples(count, bad_every=bad_every)]
    if modality == "text":
        from embedstream.local.samples.traffic import sentence_order

        order = sentence_order()
        return [(f"sample-{i:06d}".encode(), order[i % len(order)][1].encode()) for i in range(count)]
    if modality == "timeseries":
        from embedstream.training import synthetic

        signal = synthetic.labelled_signal(count, 32, seed=21)
        messages = []
        for i, w in enumerate(signal.windows()):
            # Each window's own time span: a window's row id is its series and start, so windows sent in
            # the same millisecond would otherwise share one row.
            start = synthetic.START_MS + i * 32 * synthetic.STEP_MS
            doc = {
                "series_id": "plant-7",
                "values": w.tolist(),
                "start_ms": start,
                "end_ms": start + 31 * synthetic.STEP_MS,
            }
            messages.append((f"sample-{i:06d}".encode(), json.dumps(doc).encode()))
        return messages[:count]
    raise ValueError(f"no samples for modality {modality!r}; one of {', '.join(MODALITIES)}")
