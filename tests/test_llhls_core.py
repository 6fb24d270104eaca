"""The LL-HLS timeline, playlists and blocking-reload rules (peerd.core.llhls), and the live
fMP4 muxer (peerd.live.llhls.Muxer) driven synchronously: no sockets, no clock, no loop."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pytest

from peerd.core.ids import cid_of
from peerd.core.llhls import Cutter, Ready, Timeline, Uris
from peerd.live.llhls import Ended, Muxer, PartReady, SegmentReady
from tests.support.livefeed import read_file
from tests.support.media import ffmpeg_path, make_media

URIS = Uris(
    init=lambda cid: f"b/{cid}.mp4",
    segment=lambda cid: f"b/{cid}.m4s",
    part=lambda n: f"part/{n}.m4s",
)
CID = "b" + "a" * 58


def _video_cuts(seconds: float, fps: int, gop_s: float, part_s: float = 0.5, seg_s: float = 2.0):
    c = Cutter(part_s, seg_s, video=True)
    cuts = []
    gop = round(gop_s * fps)
    for n in range(round(seconds * fps)):
        cut = c.place(Fraction(n, fps), n % gop == 0)
        if cut is not None:
            cuts.append(cut)
    return cuts


def test_parts_follow_the_part_target_and_segments_start_at_keyframes() -> None:
    cuts = _video_cuts(6, 30, 1.0)
    assert [c.at for c in cuts] == [Fraction(k, 2) for k in range(1, 12)]
    assert [c.at for c in cuts if c.segment] == [2, 4]


def test_a_segment_waits_for_the_first_keyframe_past_its_target() -> None:
    cuts = _video_cuts(9.1, 30, 3.0)
    assert [c.at for c in cuts if c.segment] == [3, 6, 9]
    parts = [b.at - a.at for a, b in zip(cuts, cuts[1:], strict=False)]
    assert max(parts) <= Fraction(1, 2)


def test_parts_never_exceed_the_target_at_25_fps() -> None:
    c = Cutter(0.5, 2.0, video=True)
    start, longest = Fraction(0), Fraction(0)
    for n in range(250):
        cut = c.place(Fraction(n, 25), n % 25 == 0)
        if cut is not None:
            longest = max(longest, cut.at - start)
            start = cut.at
    assert 0 < longest <= Fraction(1, 2)


def test_audio_only_is_cut_by_duration() -> None:
    c = Cutter(0.5, 2.0, video=False)
    cuts = [c.place(Fraction(1024 * n, 48000), True) for n in range(48000 * 7 // 1024)]
    segs = [x.at for x in cuts if x is not None and x.segment]
    assert segs
    assert all(b - a <= 2 for a, b in zip([Fraction(0), *segs], segs, strict=False))
    assert all(b - a > Fraction(19, 10) for a, b in zip([Fraction(0), *segs], segs, strict=False))


def _timeline(segments: int, parts_per: int = 4, window: int = 6, current: int = 0) -> Timeline:
    tl = Timeline(part_s=0.5, segment_s=2.0, window=window, wall_start=1_800_000_000.0)
    tl.init = CID
    t = Fraction(0)
    for s in range(segments):
        for k in range(parts_per):
            tl.add_part(t, Fraction(1, 2), k == 0)
            t += Fraction(1, 2)
        tl.close_segment("b" + chr(ord("a") + s % 26) * 58)
    for k in range(current):
        tl.add_part(t, Fraction(1, 2), k == 0)
        t += Fraction(1, 2)
    return tl


def test_playlist_has_every_low_latency_tag() -> None:
    text = _timeline(3, current=2).render(URIS)
    lines = text.splitlines()
    assert lines[:7] == [
        "#EXTM3U",
        "#EXT-X-VERSION:6",
        "#EXT-X-TARGETDURATION:2",
        "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.500,CAN-SKIP-UNTIL=12",
        "#EXT-X-PART-INF:PART-TARGET=0.500",
        "#EXT-X-MEDIA-SEQUENCE:0",
        f'#EXT-X-MAP:URI="b/{CID}.mp4"',
    ]
    assert lines[7] == "#EXT-X-PROGRAM-DATE-TIME:2027-01-15T08:00:00.000Z"
    assert lines.count("#EXTINF:2.00000,") == 3
    # 14 parts: 12 of the complete segments (all within three target durations), 2 current
    parts = [x for x in lines if x.startswith("#EXT-X-PART:")]
    assert len(parts) == 14
    assert parts[0] == '#EXT-X-PART:DURATION=0.50000,URI="part/0.m4s",INDEPENDENT=YES'
    assert parts[1] == '#EXT-X-PART:DURATION=0.50000,URI="part/1.m4s"'
    assert lines[-1] == '#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part/14.m4s"'
    assert "#EXT-X-ENDLIST" not in lines


def test_old_segments_lose_their_parts_and_leave_the_window() -> None:
    tl = _timeline(10, window=6, current=1)
    lines = tl.render(URIS).splitlines()
    assert "#EXT-X-MEDIA-SEQUENCE:4" in lines
    assert lines.count("#EXTINF:2.00000,") == 6
    # parts of segments ending within 6 s of the end (0.5 s of current): segments 7..9, current
    parts = [x for x in lines if x.startswith("#EXT-X-PART:")]
    assert len(parts) == 3 * 4 + 1
    assert parts[0].endswith('URI="part/28.m4s",INDEPENDENT=YES')
    assert tl.part(27) is not None
    assert tl.part(15) is None
    assert tl.segment("b" + "e" * 58) is not None
    assert tl.segment("b" + "a" * 58) is None


def test_delta_update_skips_segments_past_the_skip_boundary() -> None:
    tl = _timeline(12, window=12, current=2)
    full = tl.render(URIS).splitlines()
    delta = tl.render(URIS, skip=True).splitlines()
    assert "#EXT-X-VERSION:9" in delta
    # 25 s listed; segments ending at least 12 s before the end (25 s) are those ending <= 13 s
    assert "#EXT-X-SKIP:SKIPPED-SEGMENTS=6" in delta
    assert delta.count("#EXTINF:2.00000,") == 6
    assert "#EXT-X-MEDIA-SEQUENCE:0" in delta
    # the rest is the full playlist's tail, from the seventh segment on
    tail = full[full.index('#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part/50.m4s"') - 8 :]
    assert delta[-len(tail) :] == tail
    pdt = next(x for x in delta if x.startswith("#EXT-X-PROGRAM-DATE-TIME:"))
    assert pdt.endswith("08:00:12.000Z")
    # nothing old enough: no skip, version 6
    short = _timeline(3).render(URIS, skip=True)
    assert "EXT-X-SKIP" not in short
    assert "#EXT-X-VERSION:6" in short


def test_end_lists_endlist_without_a_hint() -> None:
    tl = _timeline(2)
    tl.end()
    lines = tl.render(URIS).splitlines()
    assert lines[-1] == "#EXT-X-ENDLIST"
    assert not any(x.startswith("#EXT-X-PRELOAD-HINT") for x in lines)
    assert tl.ready(5, 0) is Ready.BAD  # still more than two segments ahead
    assert tl.ready(3, 0) is Ready.NOW  # the playlist will not grow: answer at once


@pytest.mark.parametrize(
    ("msn", "part", "want"),
    [
        (None, None, Ready.NOW),
        (None, 0, Ready.BAD),
        (2, None, Ready.NOW),  # segment 2 complete
        (3, None, Ready.WAIT),  # in progress
        (3, 1, Ready.NOW),  # exists
        (3, 2, Ready.WAIT),  # the next part
        (3, 7, Ready.WAIT),  # within the advance part limit (6 at 0.5 s parts)
        (3, 8, Ready.BAD),
        (4, 0, Ready.WAIT),
        (5, 0, Ready.BAD),  # more than two past the last complete segment
        (1, 9, Ready.NOW),  # a complete segment satisfies any part
    ],
)
def test_blocking_reload_decisions(msn: int | None, part: int | None, want: Ready) -> None:
    assert _timeline(3, current=2).ready(msn, part) is want


def test_uris_cannot_inject_tags() -> None:
    bad = Uris(init=lambda c: "x\n#EXT-X-ENDLIST", segment=URIS.segment, part=URIS.part)
    with pytest.raises(ValueError, match="unusable"):
        _timeline(1).render(bad)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six seconds of H.264 (keyframe each second) + AAC."""
    return make_media(tmp_path_factory.mktemp("llhls") / "clip.mp4", seconds=6)


def _mux(path: Path) -> tuple[bytes, list[PartReady], list[SegmentReady], list[Ended]]:
    tracks, frames = read_file(path)
    m = Muxer(tracks, 0.5, 2.0)
    events = []
    for f in frames:
        events += m.frame(f)
    events += m.end("unpublished")
    return (
        m.init,
        [e for e in events if isinstance(e, PartReady)],
        [e for e in events if isinstance(e, SegmentReady)],
        [e for e in events if isinstance(e, Ended)],
    )


def test_muxer_parts_make_the_segments_and_repeat_exactly(clip: Path) -> None:
    init, parts, segments, ended = _mux(clip)
    assert ended == [Ended("unpublished")]
    assert len(segments) == 3
    assert len(parts) == 12
    assert b"".join(p.data for p in parts) == b"".join(s.data for s in segments)
    for s in segments:
        assert cid_of(s.data) == s.cid
    assert [p.independent for p in parts] == [True, False] * 6
    assert sum(p.duration for p in parts) == 6
    init2, _, segments2, _ = _mux(clip)
    assert init2 == init
    assert [s.cid for s in segments2] == [s.cid for s in segments]


@pytest.mark.parametrize(
    ("name", "acodec", "video"),
    [
        ("h264-opus.mkv", "opus", True),
        ("aac-only.mp4", "aac", False),
        ("opus-only.mkv", "opus", False),
    ],
)
def test_muxer_output_decodes_without_error(
    tmp_path: Path, name: str, acodec: str, video: bool
) -> None:
    src = make_media(tmp_path / name, seconds=5, acodec=acodec)
    if not video:  # audio only: the same clip without its video stream
        only = tmp_path / f"a-{name}"
        subprocess.run(  # noqa: S603 - fixed argument list
            [ffmpeg_path(), "-v", "error", "-i", str(src), "-map", "0:a", "-c", "copy", str(only)],
            check=True,
        )
        src = only
    init, parts, segments, _ = _mux(src)
    assert parts
    assert b"".join(p.data for p in parts) == b"".join(s.data for s in segments)
    out = tmp_path / "live.mp4"
    out.write_bytes(init + b"".join(s.data for s in segments))
    probe = subprocess.run(  # noqa: S603 - fixed argument list
        [
            shutil.which("ffprobe") or "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name",
            "-of",
            "csv=p=0",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert sorted(probe.stdout.split()) == sorted(["h264", acodec] if video else [acodec])
    decode = subprocess.run(  # noqa: S603 - fixed argument list
        [ffmpeg_path(), "-v", "error", "-xerror", "-i", str(out), "-f", "null", "-"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert decode.returncode == 0, decode.stderr
    assert decode.stderr == ""


def test_a_millisecond_clock_keeps_aac_frames_whole(tmp_path: Path, clip: Path) -> None:
    """RTMP stamps frames in milliseconds: 1024-sample AAC frames at 48 kHz arrive 21 or 22 ms
    apart, and still become 1024-sample samples, and the result decodes without error."""
    tracks, frames = read_file(clip)
    ms_tracks = [replace(t, timescale=1000) for t in tracks]
    ms_frames = [
        replace(
            f,
            dts=round(Fraction(f.dts * 1000, tracks[f.track].timescale)),
            pts=round(Fraction(f.pts * 1000, tracks[f.track].timescale)),
        )
        for f in frames
    ]
    m = Muxer(ms_tracks, 0.5, 2.0)
    events = []
    for f in ms_frames:
        events += m.frame(f)
    events += m.end("unpublished")
    out = tmp_path / "ms.mp4"
    out.write_bytes(m.init + b"".join(e.data for e in events if isinstance(e, SegmentReady)))
    probe = subprocess.run(  # noqa: S603 - fixed argument list
        [
            shutil.which("ffprobe") or "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "a",
            "-show_entries",
            "packet=pts",
            "-of",
            "csv=p=0",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    pts = [int(x) for x in probe.stdout.split()]
    assert {b - a for a, b in zip(pts, pts[1:], strict=False)} == {1024}
    decode = subprocess.run(  # noqa: S603 - fixed argument list
        [ffmpeg_path(), "-v", "error", "-xerror", "-i", str(out), "-f", "null", "-"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert decode.returncode == 0, decode.stderr
