"""What a node fetches ahead of a viewer's stream (:mod:`peerd.core.lookahead`), played the way
an ABR player asks: start low, switch up after the first segment, stay, switch again."""

from __future__ import annotations

from peerd.core.ids import cid_of
from peerd.core.lookahead import Lookahead
from peerd.core.manifest import Manifest, PlayOrder, Rendition, Segment


def _ladder() -> tuple[PlayOrder, dict[str, list[str]], dict[str, str]]:
    segs = {r: [str(cid_of(f"{r}-{i}".encode())) for i in range(6)] for r in ("lo", "hi")}
    inits = {r: str(cid_of(f"{r}-init".encode())) for r in ("lo", "hi")}

    def rendition(rid: str, bandwidth: int) -> Rendition:
        return Rendition(
            id=rid,
            kind="video",
            codecs="avc1.64001f",
            bandwidth=bandwidth,
            timescale=1000,
            segments=tuple(Segment(duration=2000, cid=c) for c in segs[rid]),
            width=640,
            height=360,
            init=inits[rid],
        )

    m = Manifest("fmp4", (rendition("lo", 500_000), rendition("hi", 2_000_000)))
    return PlayOrder.of(m), segs, inits


def test_nothing_is_fetched_ahead_in_a_rendition_the_player_leaves() -> None:
    order, seg, init = _ladder()
    la = Lookahead(2)
    v = ("media", "viewer-token")
    # Startup: the init, then the first segment at a rendition chosen before any measurement.
    assert la.ahead(order, init["lo"], v) == (seg["lo"][0],)
    assert la.ahead(order, seg["lo"][0], v) == ()
    # ABR moves up: the new rendition's init brings the segments after the player's position.
    assert la.ahead(order, init["hi"], v) == (seg["hi"][1], seg["hi"][2])
    assert la.ahead(order, seg["hi"][1], v) == ()
    # Staying on it: the next two, as the window moves.
    assert la.ahead(order, seg["hi"][2], v) == (seg["hi"][3], seg["hi"][4])
    assert la.ahead(order, seg["hi"][3], v) == (seg["hi"][4], seg["hi"][5])
    # Down again, with the init held by the player already: a switch fetches nothing ahead.
    assert la.ahead(order, seg["lo"][4], v) == ()
    assert la.ahead(order, seg["lo"][5], v) == ()


def test_streams_are_apart_and_an_unnamed_one_reads_straight_on() -> None:
    order, seg, init = _ladder()
    la = Lookahead(2, max_streams=1)
    assert la.ahead(order, seg["lo"][0], ("m", "a")) == ()
    assert la.ahead(order, seg["hi"][0], ("m", "b")) == ()  # another viewer: its own position
    # Only one stream remembered: "a" was forgotten, so its next segment is a first one.
    assert la.ahead(order, seg["lo"][1], ("m", "a")) == ()
    assert la.ahead(order, seg["lo"][2], ("m", "a")) == (seg["lo"][3], seg["lo"][4])
    assert la.ahead(order, seg["lo"][0], None) == (seg["lo"][1], seg["lo"][2])
    assert la.ahead(order, init["hi"], None) == (seg["hi"][0], seg["hi"][1])
    assert la.ahead(order, str(cid_of(b"stranger")), ("m", "a")) == ()
    assert Lookahead(0).ahead(order, seg["lo"][0], None) == ()
