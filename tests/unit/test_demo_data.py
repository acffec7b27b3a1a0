"""The demo's traffic: what each key should land near, and which keys are bad on purpose."""

from __future__ import annotations

from collections import Counter

import pytest

from embedstream.config import load_settings
from embedstream.local.quality import retrieval
from embedstream.local.samples.paraphrases import PARAPHRASES
from embedstream.local.samples.traffic import BAD_TEXTS, image_traffic, sentence_order, text_traffic


@pytest.fixture(scope="module")
def base():
    return load_settings()


def test_text_traffic_scores_first_sends_of_paraphrase_groups_and_marks_the_bad_ones(base):
    t = text_traffic(base, 300, bad_every=50)
    assert len(t.messages) == 300 and t.settings.encoder.family == "transformer"
    values = dict(t.messages)
    assert [values[k] for k in t.bad_keys] == [BAD_TEXTS[i % 2] for i in range(6)]
    sentences = [s for g in PARAPHRASES for s in g]
    # every sentence is scored exactly once, repeats are not (an identical text is a free hit)
    scored = [values[k].decode() for k in t.groups]
    assert sorted(scored) == sorted(sentences)
    assert not set(t.groups) & set(t.bad_keys)


def test_a_short_text_stream_still_holds_pairs_of_paraphrases(base):
    t = text_traffic(base, 60, bad_every=0)
    sizes = Counter(t.groups.values())
    assert len(t.groups) == 60
    assert sum(n >= 2 for n in sizes.values()) >= 20


def test_the_sentence_order_takes_each_group_in_turn():
    order = sentence_order()
    assert len(order) == sum(len(g) for g in PARAPHRASES)
    assert [g for g, _ in order[: len(PARAPHRASES)]] == list(range(len(PARAPHRASES)))


def test_the_paraphrase_set_is_big_and_word_overlap_alone_does_not_solve_it():
    assert 30 <= len(PARAPHRASES) <= 40
    assert all(3 <= len(g) <= 4 for g in PARAPHRASES)
    assert len({s for g in PARAPHRASES for s in g}) == sum(len(g) for g in PARAPHRASES)
    from sklearn.feature_extraction.text import TfidfVectorizer

    sentences = [s for g in PARAPHRASES for s in g]
    labels = [i for i, g in enumerate(PARAPHRASES) for _ in g]
    words = TfidfVectorizer().fit_transform(sentences).toarray()
    # shared words find some paraphrases (a sentence encoder should find nearly all of them)
    assert 0.5 < retrieval(labels, words).top1 < 0.9


def test_image_traffic_groups_every_good_copy_by_its_photo(base):
    t = image_traffic(base, 60, bad_every=10)
    assert len(t.messages) == 60 and len(t.bad_keys) == 6
    assert set(t.groups) | set(t.bad_keys) == {k for k, _ in t.messages}
    assert min(Counter(t.groups.values()).values()) >= 2


def test_the_bench_gets_traffic_without_bad_messages(base):
    for traffic in (image_traffic(base, 30, bad_every=0), text_traffic(base, 30, bad_every=0)):
        assert traffic.bad_keys == [] and len(traffic.messages) == 30
        assert all(v for _, v in traffic.messages)


def test_the_summary_shows_the_retrieval_figure_beside_chance():
    import io

    from rich.console import Console

    from embedstream.local.demo import DemoSummary, print_summary
    from embedstream.local.quality import Retrieval

    out = io.StringIO()
    scored = DemoSummary("image", "m", 300, 294, 6, 20.0, 1.0, 2.0, retrieval=Retrieval(294, 0.97, 1.0, 0.04, 0.17))
    print_summary([scored, DemoSummary("timeseries", "ts", 102, 100, 2, 1.0, 1.0, 1.0)], Console(file=out, width=120))
    lines = {line.split("│")[1].strip(): line for line in out.getvalue().splitlines() if line.count("│") >= 3}
    assert "0.97 / 1.00" in lines["neighbour top-1 / top-5"]
    assert "0.04 / 0.17 (294)" in lines["chance (rows scored)"]
