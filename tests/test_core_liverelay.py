"""The live state an origin sends a relay (peerd.core.liverelay): a rebuilt timeline renders
and answers blocking reloads exactly as the origin's; malformed states are refused."""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest

from peerd.core import liverelay, llhls
from peerd.core.ids import cid_of

URIS = llhls.Uris(
    init=lambda c: f"b/{c}.mp4?token=t",
    segment=lambda c: f"b/{c}.m4s?token=t",
    part=lambda n: f"part/abcd1234/{n}.m4s?token=t",
)


def timeline(segments: int, parts_in_progress: int) -> llhls.Timeline:
    tl = llhls.Timeline(part_s=0.5, segment_s=1.0, window=3, wall_start=1_700_000_000.25)
    tl.init = cid_of(b"init")
    t = Fraction(0)
    for s in range(segments):
        for _ in range(2):
            tl.add_part(t, Fraction(1, 2), True)
            t += Fraction(1, 2)
        tl.close_segment(cid_of(f"seg{s}".encode()))
    for _ in range(parts_in_progress):
        tl.add_part(t, Fraction(12, 25), False)
        t += Fraction(12, 25)
    return tl


@pytest.mark.parametrize(("segments", "current"), [(0, 0), (0, 1), (2, 1), (5, 0), (7, 2)])
def test_round_trip_renders_and_blocks_alike(segments: int, current: int) -> None:
    tl = timeline(segments, current)
    back, pub = liverelay.decode(json.loads(json.dumps(liverelay.encode(tl, "abcd1234"))))
    assert pub == "abcd1234"
    assert back.render(URIS) == tl.render(URIS)
    assert back.render(URIS, skip=True) == tl.render(URIS, skip=True)
    for msn in range(0, segments + 4):
        for part in (None, 0, 1, 2, 9):
            assert back.ready(msn, part) is tl.ready(msn, part)
    assert liverelay.cids(back) == {s.cid for s in tl.segments} | {tl.init}


def test_ended_round_trips() -> None:
    tl = timeline(2, 0)
    tl.end()
    back, _ = liverelay.decode(liverelay.encode(tl, "abcd1234"))
    assert back.ended
    assert back.render(URIS).endswith("#EXT-X-ENDLIST\n")
    assert liverelay.wanted(back) is None


def test_wanted_is_the_part_after_the_newest() -> None:
    assert liverelay.wanted(None) is None
    empty = timeline(0, 0)
    assert liverelay.wanted(empty) == (0, 0)
    assert empty.ready(0, 0) is llhls.Ready.WAIT
    for segments, current in [(0, 1), (2, 0), (2, 1), (4, 2)]:
        tl = timeline(segments, current)
        want = liverelay.wanted(tl)
        assert want == (segments, current)
        # The origin holds the request until the next part exists (never answered at once,
        # which would make the relay spin).
        assert tl.ready(*want) is llhls.Ready.WAIT
        tl.add_part(Fraction(100), Fraction(1, 2), True)
        assert tl.ready(*want) is llhls.Ready.NOW


def _mutate(state: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(state))
    out[key] = value
    return out


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pub", "../x"),
        ("part_target", "0/1"),
        ("part_target", "-1/2"),
        ("init", "not-a-cid"),
        ("segments", [{"msn": 0, "start": "0/1", "duration": "1/1", "cid": "x", "parts": []}]),
        ("segments", "many"),
        ("current", [[0, 0, 0, "0/1", "1/2"]]),
        ("current", [[0, 0, 0, "0/1", "1/2", "yes"]]),
        ("next_msn", -1),
        ("ended", "no"),
        ("wall_start", "now"),
        ("window", True),
    ],
)
def test_malformed_states_are_refused(key: str, value: Any) -> None:
    state = liverelay.encode(timeline(2, 1), "abcd1234")
    with pytest.raises(ValueError, match=r"."):
        liverelay.decode(_mutate(state, key, value))
    with pytest.raises(ValueError, match=r"."):
        liverelay.decode([state])
