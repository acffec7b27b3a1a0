from embedstream.consume.batcher import MicroBatcher


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_due_when_full():
    b = MicroBatcher(3, 10.0, Clock())
    for i in range(3):
        assert not b.due()
        b.add(i)
    assert b.due() and b.take() == [0, 1, 2] and len(b) == 0


def test_due_when_oldest_item_is_old_enough():
    clock = Clock()
    b = MicroBatcher(10, 0.05, clock)
    b.add("a")
    clock.now += 0.03
    b.add("b")
    assert not b.due() and abs(b.wait_left() - 0.02) < 1e-9
    clock.now += 0.02
    assert b.due() and b.take() == ["a", "b"]


def test_take_returns_at_most_max_size_and_restarts_the_clock_for_the_rest():
    clock = Clock()
    b = MicroBatcher(2, 1.0, clock)
    for i in range(5):
        b.add(i)
    assert b.take() == [0, 1]
    clock.now += 0.5
    assert b.take() == [2, 3]
    assert len(b) == 1 and b.wait_left() == 1.0
    assert b.room == 1


def test_empty_batcher_is_never_due():
    b = MicroBatcher(2, 0.0, Clock())
    assert not b.due() and b.take() == []
