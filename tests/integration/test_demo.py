"""The demo end to end on the real local stack: every message accounted for, and the embeddings mean something.

The floors are well above what the same stream gives with random image weights (top-1 0.19 at
this count, measured in process; 0.51 at the default 300, see docs/local-stack.md) and below what
the packaged encoders reach (1.00 on both).
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from embedstream.config import load_settings
from embedstream.local.demo import print_summary, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_the_demo_accounts_for_every_message_and_retrieves_copies_and_paraphrases(tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=160)
    summaries = run_demo(load_settings(), 60, 10, 2, tmp_path, console, ("image", "text"))
    print_summary(summaries, console)
    print(out.getvalue())  # the summary, for `pytest -s`
    by = {s.modality: s for s in summaries}

    for s in summaries:
        unusual = 6 if s.modality == "image" else 0  # images that are no photographs, after the photos
        assert s.produced == 60 + unusual
        assert s.unaccounted == 0, out.getvalue()
        # the 6 bad-on-purpose messages, and only they, went to the dead-letter topic
        assert s.dead_lettered == 6 and s.bad_not_dead_lettered == 0
        assert s.embedded == 54 + unusual
        # the sink step: every row read back stored once in each store, none beyond them
        assert s.stored == {"lancedb": 54 + unusual, "feast": 54 + unusual}, out.getvalue()

    # the image model serves a detector fitted on other copies of the photos: the unusual images score higher
    assert by["image"].anomaly_auc is not None and by["image"].anomaly_auc >= 0.9, out.getvalue()
    assert "anomaly ROC-AUC" in out.getvalue()

    image, text = by["image"].retrieval, by["text"].retrieval
    assert image is not None and text is not None
    assert image.anchors == 54 and image.top1 >= 0.8, image
    # the stream's first 60 sentences: pairs of paraphrases, plus singletons as distractors
    assert text.anchors >= 40 and text.top1 >= 0.9, text
    assert "neighbour top-1 / top-5" in out.getvalue()
    # one search of a new photo copy in LanceDB, one Feast lookup equal to the published row
    assert "(never in the stream) in LanceDB table" in out.getvalue()
    assert "equal to the published row: yes" in out.getvalue()
