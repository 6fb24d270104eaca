"""Nothing dropped at ingest: every audio track, text subtitles, audio-only files (issue 19).

Real daemons and real ``peerd ingest`` commands; the results are checked by independent clients:
the master playlist as any HLS client reads it, Debian's ffmpeg/ffprobe opening and decoding it
over HTTP, the WebVTT segments parsed, and hls.js in Chromium listing and switching the audio
tracks, showing the subtitles, and playing audio-only media.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_hls_browser

from peerd.media.options import PackagingOptions
from peerd.media.package import package
from tests.support.browser import Browser, Page
from tests.support.media import (
    SRT_CUES,
    TONES,
    MemorySink,
    export_hls,
    ffmpeg_path,
    make_audio,
    make_multitrack,
)
from tests.support.process import PeerdProcess, run_cli
from tests.support.r2media import hls_url

# The second-origin player page of the hls.js tests (a fixture).
page_server = test_hls_browser.page_server

_ATTR = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


def _attrs(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _ATTR.findall(line.split(":", 1)[1])}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 -- loopback test URL
        data: bytes = r.read()
        return data


def _ffmpeg(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # noqa: S603 -- fixed argument list
        [ffmpeg_path(), "-hide_banner", "-v", "error", "-nostdin", *args],
        capture_output=True,
        check=False,
        timeout=120,
    )


def _streams(url: str) -> list[dict[str, Any]]:
    """The streams ffprobe finds at ``url``."""
    probe = subprocess.run(  # noqa: S603 -- fixed argument list
        [shutil.which("ffprobe") or "ffprobe", "-v", "error", "-of", "json", "-show_streams", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    streams: list[dict[str, Any]] = json.loads(probe.stdout)["streams"]
    return streams


def _tone(url: str) -> float:
    """The frequency (Hz) of the sine tone an HLS URL plays, from ffmpeg's decoded samples."""
    out = _ffmpeg("-i", url, "-map", "0:a:0", "-ac", "1", "-ar", "48000", "-f", "s16le", "-")
    assert out.returncode == 0, out.stderr.decode()
    pcm = memoryview(out.stdout).cast("h")
    crossings = sum(1 for a, b in zip(pcm, pcm[1:], strict=False) if a < 0 <= b)
    return crossings / (len(pcm) / 48000)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[PeerdProcess]:
    d = PeerdProcess(tmp_path / "node", config={"webrtc": {"enabled": False}})
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _ingest(daemon: PeerdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "-c", str(daemon.state_dir / "test.toml"), "ingest", "--no-progress", *args, timeout=180
    )


def _ingested(daemon: PeerdProcess, path: Path, *args: str) -> dict[str, object]:
    out = _ingest(daemon, "--json", *args, str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    res: dict[str, object] = json.loads(out.stdout)
    return res


@pytest.mark.timeout(300)
def test_every_audio_track_and_text_subtitles_reach_the_master(
    daemon: PeerdProcess, tmp_path: Path
) -> None:
    src = make_multitrack(tmp_path / "multi.mkv")
    out = _ingest(daemon, str(src))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"ok   {src} -> "), out.stdout
    # The bitmap subtitle track is not dropped silently: the command says so, and the log.
    assert f"warn {src}: subtitle stream #4 (dvdsub) skipped" in out.stdout, out.stdout
    assert "stream not packaged" in daemon.logs()
    assert "peerd_media_streams_skipped_total 1.0" in _get(daemon.base_url + "/metrics").decode()
    media_id = out.stdout.split(" -> ")[1].split()[0]

    master_url = hls_url(daemon.base_url, daemon.state_dir, media_id)
    master = _get(master_url).decode()
    media = [_attrs(ln) for ln in master.splitlines() if ln.startswith("#EXT-X-MEDIA:")]
    audio = [m for m in media if m["TYPE"] == "AUDIO"]
    subs = [m for m in media if m["TYPE"] == "SUBTITLES"]
    assert [(m["LANGUAGE"], m["DEFAULT"]) for m in audio] == [("eng", "NO"), ("fra", "YES")]
    assert all(m["GROUP-ID"] == "aud" and m["AUTOSELECT"] == "YES" for m in audio)
    assert [(m["LANGUAGE"], m["DEFAULT"]) for m in subs] == [("eng", "NO")]
    variants = [_attrs(ln) for ln in master.splitlines() if ln.startswith("#EXT-X-STREAM-INF:")]
    assert variants
    assert all(v["AUDIO"] == "aud" and v["SUBTITLES"] == "sub" for v in variants), master

    # ffprobe opens the master (every rendition) and ffmpeg decodes all of it.
    streams = _streams(master_url)
    langs = sorted(
        s.get("tags", {}).get("language", "") for s in streams if s["codec_type"] == "audio"
    )
    assert "fra" in langs, streams
    decoded = _ffmpeg("-xerror", "-i", master_url, "-map", "0", "-f", "null", "-")
    assert decoded.returncode == 0, decoded.stderr.decode()
    # Each audio rendition plays its own track; the video variants carry none of them.
    base = master_url.split("master.m3u8")[0]
    token = master_url.split("?", 1)[1]
    for m in audio:
        assert abs(_tone(base + m["URI"]) - TONES[m["LANGUAGE"]]) < 20
    variant_uri = next(
        ln for ln in master.splitlines() if ln and not ln.startswith("#") and ".m3u8" in ln
    )
    assert [s["codec_type"] for s in _streams(base + variant_uri)] == ["video"]

    # The WebVTT segments parse and carry each cue's text at its time (the timeline's origin
    # is the first decode time, a B-frame delay of a few frames before zero).
    playlist = _get(base + subs[0]["URI"]).decode()
    assert f"?{token}" in playlist
    segs = [ln for ln in playlist.splitlines() if ln and not ln.startswith("#")]
    assert all(".vtt?" in s for s in segs)
    cues: list[tuple[float, float, str]] = []
    with urllib.request.urlopen(base + segs[0], timeout=30) as r:  # noqa: S310 -- loopback
        assert r.headers["Content-Type"] == "text/vtt"
    for seg in segs:
        text = _get(base + seg).decode()
        lines = text.split("\n")
        assert lines[0] == "WEBVTT"
        assert lines[1] == "X-TIMESTAMP-MAP=MPEGTS:0,LOCAL:00:00:00.000"
        for block in text.split("\n\n")[1:]:
            timing, body = block.split("\n", 1)
            a, b = (_seconds(t) for t in timing.split(" --> "))
            cues.append((a, b, body.strip()))
    assert len(segs) == len(
        [ln for ln in _get(base + variant_uri).decode().splitlines() if ln.startswith("#EXTINF")]
    )
    for start, end, _, text in SRT_CUES:
        got = [c for c in cues if c[2] == text]
        assert got, (text, cues)
        assert all(abs(a - start) < 0.2 and abs(b - end) < 0.2 for a, b, _ in got), got


def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


@pytest.mark.timeout(300)
def test_the_same_multitrack_file_gives_the_same_media_id(tmp_path: Path) -> None:
    src = make_multitrack(tmp_path / "multi.mp4", bitmap=False)
    ids = []
    for node in ("one", "two"):
        out = run_cli(
            "ingest", "--no-progress", "--json", str(src), state_dir=tmp_path / node, timeout=180
        )
        assert out.returncode == 0, out.stdout + out.stderr
        res = json.loads(out.stdout)
        assert {"a2", "t3"} <= set(res["renditions"]), res
        ids.append(res["media_id"])
    assert ids[0] == ids[1]


async def _player(browser: Browser, base: str) -> Page:
    page = await browser.new_page()
    # localhost vs 127.0.0.1: another origin than the node's, so CORS applies as on a site.
    await page.goto(base.replace("127.0.0.1", "localhost") + "/player.html")
    return page


_FATAL = "window.hlsErrors.filter(e => !e.endsWith(':false'))"
_FAILED = f"{_FATAL}.length > 0 || window.mediaErrors.length > 0"
_TIME = "document.getElementById('v').currentTime"


async def _plays_on(page: Page, seconds: float) -> None:
    """Wait until playback passes ``seconds`` more than now; fail on a fatal error."""
    now = float(await page.evaluate(_TIME))
    await page.wait_for(f"{_TIME} >= {now + seconds} || {_FAILED}", timeout_s=60)
    assert await page.evaluate(_FATAL) == []
    assert await page.evaluate("window.mediaErrors") == []
    assert await page.evaluate(_TIME) >= now + seconds


@pytest.mark.timeout(300)
@pytest.mark.parametrize("container", ["fmp4", "ts"])
async def test_hlsjs_lists_and_switches_audio_tracks_and_shows_subtitles(
    daemon: PeerdProcess, tmp_path: Path, page_server: tuple[str, dict[str, str]], container: str
) -> None:
    src = await asyncio.to_thread(make_multitrack, tmp_path / "multi.mkv", seconds=8.0)
    res = await asyncio.to_thread(_ingested, daemon, src, "--container", container)
    base, slot = page_server
    slot["src"] = hls_url(daemon.base_url, daemon.state_dir, str(res["media_id"]))
    async with Browser.launch(tmp_path / "profile") as browser:
        page = await _player(browser, base)
        await page.evaluate(
            "window.switched = [];"
            "hls.on(Hls.Events.AUDIO_TRACK_SWITCHED, (_e, d) => window.switched.push(d.id)); true"
        )
        await page.wait_for(
            f"(hls.audioTracks.length === 2 && hls.subtitleTracks.length === 1) || {_FAILED}"
        )
        tracks = await page.evaluate(
            "JSON.stringify(hls.audioTracks.map(t => [t.name, t.lang, t.default]))"
        )
        assert json.loads(tracks) == [["eng", "eng", False], ["fra", "fra", True]]
        subs = await page.evaluate(
            "JSON.stringify(hls.subtitleTracks.map(t => [t.name, t.lang, t.default]))"
        )
        assert json.loads(subs) == [["eng", "eng", False]]
        await _plays_on(page, 1.0)
        # From the default (French, an alternate rendition) to the muxed English track, and
        # back with audioTrack = 1: each switch is announced and playback goes on.
        first = await page.evaluate("hls.audioTrack")
        for target in (1 - first, 1):
            await page.evaluate(f"window.switched = []; hls.audioTrack = {target}; true")
            await page.wait_for(f"window.switched.includes({target}) || {_FAILED}")
            assert await page.evaluate("hls.audioTrack") == target
            await _plays_on(page, 1.0)
        # Subtitles on: the cues arrive in the video's TextTrack at their times.
        await page.evaluate("hls.subtitleDisplay = true; hls.subtitleTrack = 0; true")
        cues = (
            "Array.from(document.getElementById('v').textTracks)"
            ".flatMap(t => Array.from(t.cues || []))"
            ".map(c => [c.startTime, c.endTime, c.text])"
        )
        await page.wait_for(f"{cues}.length >= {len(SRT_CUES)} || {_FAILED}", timeout_s=60)
        got = json.loads(await page.evaluate(f"JSON.stringify({cues})"))
        for start, end, _, text in SRT_CUES:
            match = [c for c in got if c[2] == text]
            assert match, (text, got)
            assert abs(match[0][0] - start) < 0.15, match
            assert abs(match[0][1] - end) < 0.15, match
        await _plays_on(page, 0.5)
        assert page.console_errors == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "acodec"), [("tone.m4a", "aac"), ("tone.mp3", "mp3")])
async def test_audio_only_files_become_audio_only_hls(
    daemon: PeerdProcess,
    tmp_path: Path,
    page_server: tuple[str, dict[str, str]],
    name: str,
    acodec: str,
) -> None:
    src = await asyncio.to_thread(make_audio, tmp_path / name, seconds=6.0, acodec=acodec)
    res = await asyncio.to_thread(_ingested, daemon, src)
    assert res["warnings"] == []
    url = hls_url(daemon.base_url, daemon.state_dir, str(res["media_id"]))
    master = (await asyncio.to_thread(_get, url)).decode()
    variants = [_attrs(ln) for ln in master.splitlines() if ln.startswith("#EXT-X-STREAM-INF:")]
    assert [v["CODECS"] for v in variants] == ["mp4a.40.2"], master
    assert "RESOLUTION" not in variants[0]
    assert abs(await asyncio.to_thread(_tone, url) - 440) < 20
    decoded = await asyncio.to_thread(_ffmpeg, "-xerror", "-i", url, "-f", "null", "-")
    assert decoded.returncode == 0, decoded.stderr.decode()
    base, slot = page_server
    slot["src"] = url
    async with Browser.launch(tmp_path / "profile") as browser:
        page = await _player(browser, base)
        await _plays_on(page, 3.0)
        assert await page.evaluate("hls.levels.length") == 1
        assert page.console_errors == []


def test_a_track_shorter_than_the_video_ends_early_without_empty_segments(
    tmp_path: Path,
) -> None:
    """An audio track that ends after 2 s of a 6 s clip, and one that starts 3 s in: their
    renditions hold only segments with audio, and ffmpeg decodes every rendition."""
    src = tmp_path / "short.mkv"
    args = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=6"]
    args += ["-f", "lavfi", "-i", "sine=frequency=440:duration=6"]
    args += ["-f", "lavfi", "-i", "sine=frequency=880:duration=2"]
    args += ["-itsoffset", "3", "-f", "lavfi", "-i", "sine=frequency=660:duration=3"]
    args += ["-map", "0", "-map", "1", "-map", "2", "-map", "3", "-c:v", "libx264", "-g", "30"]
    out = _ffmpeg(*args, "-c:a", "aac", str(src))
    assert out.returncode == 0, out.stderr.decode()
    sink = MemorySink()
    opts = PackagingOptions(segment_seconds=2.0, ladder=())
    m, _ = package(src, opts, sink)
    top, *audio = m.renditions
    assert [r.kind for r in audio] == ["audio"] * 3
    assert len(top.segments) == 3
    assert [len(r.segments) for r in audio] == [3, 1, 2]
    assert audio[2].start == top.start + top.segments[0].duration  # starts with its sound
    assert all(sink.blobs[s.cid] for r in audio for s in r.segments if s.cid)
    master = export_hls(m, sink.blobs.__getitem__, tmp_path / "hls")
    decoded = _ffmpeg("-xerror", "-i", str(master), "-map", "0", "-f", "null", "-")
    assert decoded.returncode == 0, decoded.stderr.decode()


def test_track_names_are_unique_and_safe_in_a_playlist(tmp_path: Path) -> None:
    """Two audio tracks with the same title holding quotes, no default among them: the names
    lose the quotes and become unique, the first track is the default, and no language is
    invented."""
    src = tmp_path / "titled.mkv"
    title = 'Commentary "director" ' + "x" * 80
    args = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=2"]
    args += ["-f", "lavfi", "-i", "sine=frequency=440:duration=2"] * 2
    args += ["-map", "0", "-map", "1", "-map", "2", "-c:v", "libx264", "-c:a", "aac"]
    args += ["-metadata:s:a", f"title={title}", "-disposition:a", "0"]
    out = _ffmpeg(*args, str(src))
    assert out.returncode == 0, out.stderr.decode()
    m, _ = package(src, PackagingOptions(segment_seconds=2.0, ladder=()), MemorySink())
    alts = [r.alternate for r in m.renditions if r.alternate is not None]
    names = [a.name for a in alts]
    assert len(set(names)) == 2, names
    assert all('"' not in n and len(n) <= 64 for n in names), names
    assert names[0].startswith("Commentary director")
    assert [a.default for a in alts] == [True, False]
    assert [a.language for a in alts] == [None, None]
    text = export_hls(m, lambda c: b"", tmp_path / "hls").read_text()
    assert text.count("#EXT-X-MEDIA:TYPE=AUDIO") == 2
