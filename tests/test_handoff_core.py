"""The hand-off decision (peerd.core.handoff), driven with a fake clock."""

from __future__ import annotations

from peerd.core.handoff import Handoff, HandoffPolicy, Observation

POLICY = HandoffPolicy(start_viewers=50, stop_viewers=10, start_after_s=10.0, stop_after_s=60.0)


def _obs(viewers: int, admission: str = "overflow", spill: bool = False) -> Observation:
    return Observation(viewers=viewers, admission=admission, spill=spill)  # type: ignore[arg-type]


def test_starts_once_the_audience_outgrew_the_node_for_start_after_s() -> None:
    h = Handoff(POLICY)
    assert h.step(_obs(60), 0.0) is None
    assert h.step(_obs(60), 9.9) is None
    assert h.step(_obs(60), 10.0) == "start"
    assert h.active
    assert h.step(_obs(60), 11.0) is None  # started once, not again


def test_a_node_with_room_or_r2_to_spill_to_keeps_its_audience() -> None:
    for obs in (_obs(500, "open"), _obs(500, "overflow", spill=True), _obs(49)):
        h = Handoff(POLICY)
        assert [h.step(obs, float(t)) for t in range(0, 100, 5)] == [None] * 20
        assert not h.active


def test_without_an_uplink_budget_the_viewer_count_decides() -> None:
    h = Handoff(POLICY)
    h.step(_obs(50, "off"), 0.0)
    assert h.step(_obs(50, "off"), 10.0) == "start"


def test_a_break_in_the_condition_restarts_its_timer() -> None:
    h = Handoff(POLICY)
    h.step(_obs(60), 0.0)
    h.step(_obs(40), 5.0)  # dipped under the threshold
    assert h.step(_obs(60), 6.0) is None
    assert h.step(_obs(60), 15.9) is None
    assert h.step(_obs(60), 16.0) == "start"


def test_stops_only_under_stop_viewers_with_room_for_stop_after_s() -> None:
    h = Handoff(POLICY, active=True)
    # Between the thresholds (hysteresis): the hand-off holds, however long.
    assert [h.step(_obs(30, "open"), float(t)) for t in range(0, 600, 10)] == [None] * 60
    # Few viewers, but the uplink is still over its budget: it holds too.
    assert [h.step(_obs(5, "overflow"), float(t)) for t in range(600, 700, 10)] == [None] * 10
    assert h.step(_obs(5, "open"), 700.0) is None
    assert h.step(_obs(5, "open"), 759.0) is None
    assert h.step(_obs(5, "open"), 760.0) == "stop"
    assert not h.active


def test_a_count_hovering_at_the_threshold_does_not_flap() -> None:
    h = Handoff(POLICY)
    actions = []
    for t in range(0, 3600, 5):
        viewers = 48 if (t // 5) % 2 else 52  # around start_viewers, every check
        actions.append(h.step(_obs(viewers), float(t)))
    assert set(actions) == {None}
    h = Handoff(POLICY, active=True)
    actions = [h.step(_obs(9 if (t // 5) % 2 else 11, "open"), float(t)) for t in range(0, 3600, 5)]
    assert set(actions) == {None}


def test_the_input_ending_stops_a_hand_off() -> None:
    h = Handoff(POLICY)
    assert h.end() is None
    h.step(_obs(60), 0.0)
    h.step(_obs(60), 10.0)
    assert h.end() == "stop"
    assert not h.active
