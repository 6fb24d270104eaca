"""The live latency bench's LL-HLS reader (scripts/bench/live_latency.py) reads peerd's live
playlists as the renderer means them: every part under its segment's media sequence number and
index, complete segments by number, blocking reload offered, the end seen."""

from __future__ import annotations

from fractions import Fraction

from peerd.core.llhls import Timeline, Uris
from scripts.bench.live_latency import parse_playlist

URIS = Uris(
    init=lambda cid: f"b/{cid}.mp4", segment=lambda cid: f"b/{cid}.m4s", part=lambda n: f"p/{n}"
)


def _timeline(segments: int, parts_each: int, window: int) -> Timeline:
    tl = Timeline(part_s=0.5, segment_s=2.0, window=window, wall_start=1_796_630_629.0)
    tl.init = "init"
    half = Fraction(1, 2)
    t = Fraction(0)
    for s in range(segments):
        for i in range(parts_each):
            tl.add_part(t, half, independent=i == 0)
            t += half
        tl.close_segment(f"seg{s}")
    tl.add_part(t, half, independent=True)  # the segment in progress
    return tl


def test_parts_and_segments_are_numbered_as_rendered() -> None:
    # A window of 12 two-second segments: a delta update skips 6 of them.
    tl = _timeline(segments=14, parts_each=4, window=12)
    for skip in (False, True):
        text = tl.render(URIS, skip=skip)
        assert ("#EXT-X-SKIP:SKIPPED-SEGMENTS=6" in text) == skip
        pl = parse_playlist(text)
        assert pl.can_block
        assert not pl.ended
        assert pl.map_uri == "b/init.mp4"
        assert pl.next_msn == tl.next_msn
        listed = list(tl.segments)
        for seg in listed[-(len(pl.segments)) :]:
            assert pl.segments[seg.msn] == f"b/{seg.cid}.m4s"
        expected = {(p.msn, p.index): f"p/{p.number}" for s in listed for p in s.parts}
        expected |= {(p.msn, p.index): f"p/{p.number}" for p in tl.current}
        assert pl.parts, "the renderer lists the recent segments' parts"
        for key, part in pl.parts.items():
            assert expected[key] == part.uri
            assert part.independent == (key[1] == 0)
        # The part in progress is the newest, under the next segment's number.
        assert max(pl.parts) == (tl.next_msn, 0)


def test_the_end_is_seen() -> None:
    tl = _timeline(segments=2, parts_each=4, window=6)
    tl.close_segment("last")
    tl.end()
    assert parse_playlist(tl.render(URIS)).ended
