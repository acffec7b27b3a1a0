from kafka.structs import TopicPartition

from embedstream.consume.offsets import OffsetTracker

TP = TopicPartition("images", 0)
TP1 = TopicPartition("images", 1)


def test_commit_point_stops_at_the_oldest_unfinished_offset():
    t = OffsetTracker()
    for off in range(5):
        t.track(TP, off)
    for off in (0, 1, 3, 4):
        t.done(TP, off)
    assert t.committable() == {TP: 2}
    t.mark_committed({TP: 2})
    assert t.committable() == {}
    t.done(TP, 2)
    assert t.committable() == {TP: 5}


def test_nothing_to_commit_before_anything_finished():
    t = OffsetTracker()
    t.track(TP, 10)
    assert t.committable() == {}
    t.done(TP, 10)
    assert t.committable() == {TP: 11}


def test_partitions_are_independent_and_forgettable():
    t = OffsetTracker()
    t.track(TP, 0)
    t.track(TP1, 7)
    t.done(TP1, 7)
    assert t.committable() == {TP1: 8}
    assert t.in_flight() == 1
    t.forget([TP])
    assert t.in_flight() == 0
