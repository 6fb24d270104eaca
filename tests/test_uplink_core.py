"""The uplink meter and stream admission (peerd.core.uplink), driven with a fake clock."""

from __future__ import annotations

from peerd.core.uplink import Uplink


def test_rate_is_bytes_over_the_window_and_forgets_old_bytes() -> None:
    u = Uplink(window_s=10.0)
    u.sent(5000, 100.0)
    u.sent(5000, 104.0)
    assert u.rate(105.0) == 1000.0
    assert u.rate(113.5) == 500.0  # the first slot left the window
    assert u.rate(130.0) == 0.0


def test_without_a_budget_everything_is_admitted() -> None:
    u = Uplink()
    u.sent(10**9, 1.0)
    assert u.admit("a", 1.0)
    assert u.report(1.0).state == "off"


def test_admitted_streams_stay_admitted_and_new_ones_overflow() -> None:
    u = Uplink(budget_bps=1000.0, window_s=10.0)
    assert u.admit("a", 0.0)
    u.sent(6000, 1.0)  # 600 B/s; a second stream like it would make 1200 > 1000
    assert not u.admit("b", 2.0)
    assert u.report(2.0).state == "overflow"
    u.sent(20000, 3.0)  # far over budget: "a" is still served
    assert u.admit("a", 3.0)
    assert not u.admit("b", 3.0)  # a refused stream is decided again, not remembered
    assert u.report(3.0).streams == 1


def test_hysteresis_reopens_only_below_the_resume_level() -> None:
    u = Uplink(budget_bps=1000.0, window_s=10.0, resume_ratio=0.5)
    assert u.admit("a", 0.0)
    u.sent(6000, 0.0)
    assert not u.admit("b", 1.0)  # 600 + 600 > 1000
    # The first slot left the window; 450 B/s now: 900 would fit the budget, but not half of it.
    u.sent(4500, 5.0)
    assert u.rate(11.0) == 450.0
    assert not u.admit("b", 11.0)
    # Below the resume level (200 + 200 <= 500): open again, and "b" is admitted.
    u.sent(2000, 12.0)
    assert u.rate(16.0) == 200.0
    assert u.admit("b", 16.0)
    assert u.report(16.0).state == "open"


def test_idle_streams_are_forgotten() -> None:
    u = Uplink(budget_bps=1000.0, window_s=10.0, stream_idle_s=30.0)
    assert u.admit("a", 0.0)
    u.sent(9000, 0.5)
    assert u.admit("a", 20.0)  # seen again within the idle time: still admitted
    u.sent(20000, 45.0)
    # "a" was last seen at 20: gone at 51, and as a new stream it overflows.
    assert not u.admit("a", 51.0)
    assert u.report(51.0).streams == 0


def test_report_figures() -> None:
    u = Uplink(budget_bps=1000.0, window_s=10.0)
    assert u.admit("a", 0.0)
    u.sent(3000, 0.0)
    r = u.report(1.0)
    assert (r.state, r.budget_bps, r.send_bps, r.spare_bps, r.streams) == (
        "open",
        1000,
        300,
        700,
        1,
    )


def test_a_burst_of_new_streams_is_admitted_only_up_to_the_budget() -> None:
    """Bytes are counted once sent: streams admitted a moment ago count as what they will send."""
    u = Uplink(budget_bps=1000.0, window_s=10.0, stream_bps=100.0)
    admitted = [u.admit(i, 5.0) for i in range(20)]
    assert admitted == [True] * 10 + [False] * 10
    # A window later their bytes are measured instead (here: 50 B/s each), and more fit in.
    for i in range(10):
        assert u.admit(i, 15.5)
    u.sent(5000, 15.5)
    assert u.admit(10, 16.0)


def test_held_streams_stay_admitted_and_released_ones_stop_counting() -> None:
    u = Uplink(budget_bps=1000.0, window_s=10.0, stream_idle_s=30.0)
    assert u.admit("whep", 0.0)
    u.sent(9000, 0.5)
    u.hold("whep", 40.0)  # an open session, past the idle time: still one of the streams
    assert u.report(40.0).streams == 1
    u.release("whep")
    assert u.report(40.0).streams == 0
    u.release("whep")  # ended twice: nothing to forget


def test_streams_of_known_bit_rate_cost_it_once() -> None:
    """A stream whose bit rate the caller knows costs that rate, not ``stream_bps``; bytes its
    player already fetched ahead count once (in the rate or in the committed rates, not both)."""
    u = Uplink(budget_bps=1000.0, window_s=10.0, stream_bps=500.0)
    assert [u.admit(i, 0.0, 100.0) for i in range(12)] == [True] * 10 + [False] * 2
    u = Uplink(budget_bps=1000.0, window_s=10.0, stream_bps=500.0)
    assert all(u.admit(i, 0.0, 100.0) for i in range(5))
    u.sent(8000, 0.5)  # their players filled their buffers: 800 B/s over the window
    assert u.admit(5, 1.0, 100.0)  # max(800, 500) + 100 fits
    assert not u.admit(6, 1.0, 250.0)  # max(800, 600) + 250 does not
    # Streams not seen for a window no longer count (the bytes left the window too).
    assert u.admit(6, 20.0, 250.0)


def test_streams_the_bucket_can_take_leave_the_last_of_the_budget_to_the_others() -> None:
    u = Uplink(budget_bps=1000.0, window_s=10.0, resume_ratio=0.8)
    assert all(u.admit(i, 0.0, 100.0) for i in range(7))  # 700 committed
    assert not u.admit("spill", 1.0, 150.0, spill=True)  # 850 > 800: to the bucket
    assert u.report(1.0).state == "open"  # not an overflow: the node still takes others
    assert u.admit("only-here", 1.0, 150.0)  # 850 <= 1000
    assert u.admitted("only-here", 2.0)
    assert not u.admitted("spill", 2.0)


def test_a_stream_the_bucket_cannot_take_is_admitted_at_its_floor_while_the_floors_fit() -> None:
    """Over the budget at full cost, a stream with nowhere else to go (no spill) is admitted at
    its lowest rendition as long as every stream could still play at its own: the floors of
    the streams playing, plus its own, within the budget."""
    u = Uplink(budget_bps=1000.0, window_s=10.0)
    assert u.admit("a", 0.0, 800.0, floor_bps=400.0)
    u.sent(8000, 0.5)  # "a" plays its top rendition: 800 B/s
    assert not u.takes(1.0, 800.0)  # 800 + 800 > 1000: not at full cost
    assert not u.admit("b", 1.0, 800.0, spill=True, floor_bps=400.0)  # the bucket takes it
    assert not u.admit("b", 1.0, 800.0, floor_bps=0.0)  # no floor known: refused, as before
    assert u.admit("b", 1.0, 800.0, floor_bps=400.0)  # floors 400 + 400 <= 1000
    r = u.report(1.0)
    assert (r.state, r.streams, r.floor_spare_bps) == ("overflow", 2, 200)
    # A third would make the floors 1200: refused (503), whatever "a" and "b" send now.
    assert not u.admit("c", 2.0, 800.0, floor_bps=400.0)
    assert u.admitted("a", 2.0)
    assert u.admitted("b", 2.0)
    # "b" left (unseen for two windows), "a" plays on: room at the floor again.
    assert u.admitted("a", 15.0)
    u.sent(8000, 15.0)
    assert u.floors(23.0) == 400.0
    assert u.admit("c", 23.0, 800.0, floor_bps=400.0)
    assert u.report(23.0).floor_spare_bps == 200


def test_floors_of_streams_of_unknown_rendition_count_their_cost() -> None:
    """A stream admitted without a known floor counts its cost among the floors, and one of
    unknown cost (a WHEP session) ``stream_bps``: room at the floor is never overstated."""
    u = Uplink(budget_bps=1000.0, window_s=10.0, stream_bps=300.0)
    assert u.admit("hls", 0.0, 500.0)
    u.hold("whep", 0.0)
    assert u.floors(1.0) == 800.0
    assert u.report(1.0).floor_spare_bps == 200
    assert not u.admit("new", 1.0, 600.0, floor_bps=250.0)  # 800 + 250 > 1000
    assert u.admit("new", 1.0, 600.0, floor_bps=200.0)
    assert Uplink().report(0.0).floor_spare_bps == 0  # admission off
