"""Access counter: counts, then drains empty."""

from peerd.core.access import AccessCounter


def test_record_and_drain() -> None:
    c = AccessCounter()
    c.record("a", 10, 1.0)
    c.record("a", 5, 2.0)
    c.record("b", 1, 3.0)
    assert len(c) == 2
    got = c.drain()
    assert got["a"].hits == 2
    assert got["a"].bytes == 15
    assert (got["a"].first, got["a"].last) == (1.0, 2.0)
    assert len(c) == 0
    assert c.drain() == {}
