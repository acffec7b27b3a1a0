"""``embedstream samples`` and ``produce-samples --modality``: the packaged samples as files and messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from embedstream.cli import main
from embedstream.local.samples.catalog import MODALITIES, sample_messages


def test_samples_writes_the_photos_and_the_sentences_as_files(tmp_path: Path, capsys) -> None:
    assert main(["samples", "photos", "--out", str(tmp_path / "photos")]) == 0
    photos = sorted((tmp_path / "photos").iterdir())
    assert len(photos) == 25 and "wrote 25 photos" in capsys.readouterr().out
    for p in photos:
        with Image.open(p) as img:  # real images, readable as train detector --data reads them
            assert min(img.size) >= 64
    assert main(["samples", "sentences", "--out", str(tmp_path / "s" / "sentences.txt")]) == 0
    lines = (tmp_path / "s" / "sentences.txt").read_text().splitlines()
    assert len(lines) == 107 and all(line.strip() for line in lines)
    assert "The morning train to Leeds has been cancelled." in lines


@pytest.mark.parametrize("modality", MODALITIES)
def test_sample_messages_are_keyed_and_what_the_modality_reads(modality: str) -> None:
    messages = sample_messages(modality, 12, bad_every=0)
    assert [k for k, _ in messages] == [f"sample-{i:06d}".encode() for i in range(12)]
    if modality == "text":
        assert all(v.decode().strip() for _, v in messages)
    elif modality == "timeseries":
        for _, v in messages:
            doc = json.loads(v)
            assert doc["series_id"] == "plant-7" and len(doc["values"]) == 32 and len(doc["values"][0]) == 3
            assert doc["end_ms"] > doc["start_ms"]
    else:
        assert all(v[:2] in (b"\xff\xd8", b"\x89P", b"RI") for _, v in messages)


def test_an_unknown_modality_is_refused() -> None:
    with pytest.raises(ValueError, match="no samples for modality 'audio'"):
        sample_messages("audio", 1)
