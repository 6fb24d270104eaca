"""The native MP4/MOV remux (`peerd.media.isobmff`) against the PyAV path on the same sources.

Every source is packaged twice, natively and with the native path switched off, and the two
must agree: the same segment boundaries and durations, the same start, and the same packets
(stream, timestamps, size, key flag) in every segment as ffprobe reads them. Also: the rule for
which files go native, determinism, derived rungs decoding native segments, and corrupt moov
boxes (the parser only ever raises `Unsupported`, so the PyAV path reports the error).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from peerd.core import manifest as mf
from peerd.errors import MediaError
from peerd.media import isobmff, remux
from peerd.media import package as pkg
from peerd.media.options import PackagingOptions, Rung
from peerd.media.probe import probe
from tests.support.media import MemorySink, export_hls, ffmpeg_path, ffprobe_json, make_media


def _ffmpeg(*args: str) -> None:
    subprocess.run(  # noqa: S603 - fixed argument list
        [ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        check=True,
    )


SOURCES: dict[str, dict[str, Any]] = {
    "h264_aac.mp4": {"seconds": 5.0},
    "h264_aac_gop45.mov": {"seconds": 6.2, "gop": 45, "sample_rate": 44100},
    "hevc_aac.mp4": {"vcodec": "hevc", "seconds": 3.0},
    "h264_opus.mp4": {"acodec": "opus", "seconds": 3.3},
    "vfr.mp4": {"vfr": True, "seconds": 4.3},
    "noaudio_odd.mp4": {"acodec": None, "seconds": 5.1, "size": (150, 90), "rate": 25},
    "odd_44k.mp4": {"seconds": 3.37, "size": (200, 112), "rate": 24, "sample_rate": 44100},
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("native")
    out = {name: make_media(d / name, **kw) for name, kw in SOURCES.items()}
    base = out["h264_aac.mp4"]
    # Edit lists: a copy cut at a non-keyframe time (a media-time edit) and one whose video
    # starts late (a leading empty edit), plus the index at the front (faststart).
    _ffmpeg("-ss", "1.3", "-i", str(base), "-c", "copy", str(d / "edit_start.mp4"))
    out["edit_start.mp4"] = d / "edit_start.mp4"
    _ffmpeg(
        *("-itsoffset", "0.5", "-i", str(base), "-i", str(base)),
        *("-map", "0:v", "-map", "1:a", "-c", "copy", str(d / "edit_empty.mp4")),
    )
    out["edit_empty.mp4"] = d / "edit_empty.mp4"
    _ffmpeg("-i", str(base), "-c", "copy", "-movflags", "+faststart", str(d / "faststart.mp4"))
    out["faststart.mp4"] = d / "faststart.mp4"
    return out


def _package(
    path: Path, opts: PackagingOptions, native: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[mf.Manifest, MemorySink]:
    sink = MemorySink()
    with monkeypatch.context() as m:
        if not native:
            m.setattr(remux, "open_native", lambda src, opts: None)
        manifest, _ = pkg.package(path, opts, sink)
    return manifest, sink


def _goes_native(path: Path, **kw: Any) -> bool:
    """Whether the packager would take the native path for `path` with these options."""
    out = remux.open_native(probe(path), PackagingOptions(**kw))
    if out is not None:
        os.close(out.fd)
    return out is not None


def _packets(init: bytes, seg: bytes, out: Path) -> list[tuple[str, str, str, str, bool]]:
    one = out / "one.mp4"
    one.write_bytes(init + seg)
    info = ffprobe_json(one, "-show_entries", "packet=codec_type,pts,dts,size,flags")
    return sorted(
        (p["codec_type"], p["pts"], p["dts"], p["size"], p["flags"].startswith("K"))
        for p in info["packets"]
    )


@pytest.mark.parametrize("name", [*SOURCES, "edit_start.mp4", "edit_empty.mp4", "faststart.mp4"])
def test_native_remux_matches_the_pyav_path(
    sources: dict[str, Path], tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = sources[name]
    opts = PackagingOptions(segment_seconds=2.0)
    assert _goes_native(src, segment_seconds=2.0)
    native, nsink = _package(src, opts, True, monkeypatch)
    pyav, psink = _package(src, opts, False, monkeypatch)
    n, p = native.renditions[0], pyav.renditions[0]
    assert [s.duration for s in n.segments] == [s.duration for s in p.segments]
    assert n.start == p.start
    assert n.codecs == p.codecs
    assert (n.width, n.height, n.frame_rate) == (p.width, p.height, p.frame_rate)
    assert n.init is not None
    assert p.init is not None
    for ns, ps in zip(n.segments, p.segments, strict=True):
        assert ns.cid is not None
        assert ps.cid is not None
        got = _packets(nsink.blobs[n.init], nsink.blobs[ns.cid], tmp_path)
        want = _packets(psink.blobs[p.init], psink.blobs[ps.cid], tmp_path)
        assert got == want
    # The HLS export plays from start to end without a decoder error.
    master = export_hls(native, nsink.blobs.__getitem__, tmp_path / "hls")
    run = subprocess.run(  # noqa: S603 - fixed argument list
        [ffmpeg_path(), "-v", "error", "-nostdin", "-i", str(master), "-f", "null", "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stderr == ""
    whole = ffprobe_json(tmp_path / "hls" / f"{n.id}.m3u8", "-show_entries", "format=duration")
    fps = float(SOURCES.get(name, {}).get("rate", 30))
    assert abs(float(whole["format"]["duration"]) - n.duration_seconds) <= 2 / fps


def test_native_remux_is_deterministic_and_feeds_derived_rungs(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = sources["h264_aac.mp4"]
    opts = PackagingOptions(segment_seconds=2.0, ladder=(Rung(72),), audio_only=True)
    a, sa = _package(src, opts, True, monkeypatch)
    b, sb = _package(src, opts, True, monkeypatch)
    assert mf.media_id_of(a) == mf.media_id_of(b)
    assert sa.blobs == sb.blobs
    # The ladder rung and the audio rendition were decoded from the native fMP4 segments.
    assert [r.id for r in a.renditions] == ["v120", "v72", "audio"]
    for r in a.renditions[1:]:
        assert [s.duration for s in r.segments] == [s.duration for s in a.renditions[0].segments]
        assert r.init is not None
        for s in r.segments:
            assert s.cid is not None
            assert _packets(sa.blobs[r.init], sa.blobs[s.cid], tmp_path)


def test_which_sources_go_native(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mp4 = sources["h264_aac.mp4"]
    mkv = make_media(tmp_path / "h264_aac.mkv", seconds=2.0)
    mp3 = make_media(tmp_path / "h264_mp3.mp4", acodec="mp3", seconds=2.0)
    native = _goes_native
    assert native(mp4)
    assert not native(mp4, container="ts")  # MPEG-TS output: libav's muxer
    assert not native(mkv)  # not ISO-BMFF
    assert not native(mp3)  # audio that is transcoded to AAC
    # A transcode never asks: the top pass re-encodes.
    m, _ = _package(mp4, PackagingOptions(transcode="always"), True, monkeypatch)
    assert m.renditions[0].codecs.startswith("avc1.")


def _moov(path: Path) -> tuple[bytes, int]:
    data = path.read_bytes()
    for typ, off, _, size in isobmff.boxes(data):
        if typ == b"moov":
            return data[off : off + size], len(data)
    raise AssertionError("no moov")


def test_corrupt_moov_only_raises_unsupported(sources: dict[str, Path]) -> None:
    moov, size = _moov(sources["h264_aac.mp4"])
    movie = isobmff.parse_movie(moov, size)
    assert [t.handler for t in movie.tracks] == [b"vide", b"soun"]
    # Cut short anywhere, or with a box size bent, the parser reports Unsupported and nothing else.
    for cut in range(8, len(moov), max(1, len(moov) // 97)):
        broken = bytearray(moov[:cut])
        broken[0:4] = cut.to_bytes(4, "big")
        with pytest.raises(isobmff.Unsupported):
            isobmff.parse_movie(bytes(broken), size)
    stsz = moov.find(b"stsz")
    bent = bytearray(moov)
    bent[stsz + 12 : stsz + 16] = (10**6).to_bytes(4, "big")  # more samples than the tables
    with pytest.raises(isobmff.Unsupported):
        isobmff.parse_movie(bytes(bent), size)
    # Sample data past the end of the file: a truncated faststart file.
    with pytest.raises(isobmff.Unsupported, match="past the end"):
        isobmff.parse_movie(moov, size // 2)


def test_truncated_faststart_mp4_fails_naming_the_file(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    data = sources["faststart.mp4"].read_bytes()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: int(len(data) * 0.4)])
    sink = MemorySink()
    with pytest.raises(MediaError, match=r"cut\.mp4: .*truncated"):
        pkg.package(bad, PackagingOptions(), sink)


def test_read_samples_places_every_range_where_a_plain_read_would(tmp_path: Path) -> None:
    """A segment read equals header + each range read on its own, in the given order (not file
    order), with gaps of other bytes between the ranges skipped; a short file is an error."""
    import random

    rng = random.Random(7)
    blob = rng.randbytes(1 << 20)
    path = tmp_path / "file.bin"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(50):
            cuts = sorted(rng.sample(range(len(blob)), 2 * rng.randint(1, 12)))
            ranges = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
            rng.shuffle(ranges)  # tracks come in runs order, not file order
            header = rng.randbytes(rng.randint(0, 300))
            got = remux.read_samples(fd, path, header, ranges)
            assert bytes(got) == header + b"".join(blob[o:e] for o, e in ranges)
        with pytest.raises(MediaError, match="truncated"):
            remux.read_samples(fd, path, b"", [(len(blob) - 10, len(blob) + 10)])
    finally:
        os.close(fd)


def test_native_remux_keeps_no_segment_alive(tmp_path: Path) -> None:
    """The packager keeps no reference to segments the sink already has, so a sink that drops
    them frees them: a long film would otherwise sit in memory until the end."""
    import sys

    src = make_media(tmp_path / "clip.mp4", seconds=6.0, gop=15)
    seen: list[Any] = []
    held_elsewhere: list[int] = []

    def sink(data: bytes, kind: str, cid: mf.Cid) -> mf.Cid:
        if kind == "segment":
            seen.append(data)
            # Segments well behind the pipeline's depth: referenced by `seen` (and the
            # getrefcount argument) only.
            for i in range(len(seen) - 8):
                if sys.getrefcount(seen[i]) > 2:  # the list's and the argument's references
                    held_elsewhere.append(i)
        return cid

    manifest, _ = pkg.package(src, PackagingOptions(segment_seconds=0.5), sink)
    assert len(seen) == len(manifest.renditions[0].segments) >= 12
    assert held_elsewhere == []
