"""Tiny, deterministic test media made locally with the ffmpeg CLI's lavfi sources (no downloads).

`make_media(path, ...)` writes a short synthetic clip (testsrc2 picture, sine tone) with the codec,
size, frame rate and container asked for, with bit-exact flags so the same call gives the same
bytes. `make_bad(path, kind)` writes the broken inputs the packager must refuse cleanly. Used by
the tests, `make demo` and other engineers who need sample media.

    from tests.support.media import make_media
    clip = make_media(tmp_path / "clip.mp4", seconds=3, size=(160, 120))
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from peerd.core.ids import Cid, cid_of

BadKind = Literal["empty", "text", "truncated", "subtitles_only", "unknown_codec"]

_VCODEC_ARGS: dict[str, list[str]] = {
    "h264": ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-threads", "1"],
    "hevc": [
        "-c:v",
        "libx265",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-x265-params",
        "log-level=error:pools=1:frame-threads=1",
        "-tag:v",
        "hvc1",
    ],
    "mpeg4": ["-c:v", "mpeg4", "-q:v", "5"],
    "mjpeg": ["-c:v", "mjpeg", "-q:v", "5", "-pix_fmt", "yuvj420p"],
    "vp9": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k"],
}
_ACODEC_ARGS: dict[str, list[str]] = {
    "aac": ["-c:a", "aac", "-b:a", "64k"],
    "opus": ["-c:a", "libopus", "-b:a", "48k"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "pcm": ["-c:a", "pcm_s16le"],
}


def _ffmpeg(*args: str) -> None:
    """Run the ffmpeg CLI quietly with bit-exact output; raise if it fails."""
    cmd = [ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args[:-1]]
    cmd += ["-fflags", "+bitexact", args[-1]]
    subprocess.run(cmd, check=True)  # noqa: S603 - argument list built here


def ffmpeg_path() -> str:
    """The ffmpeg executable; RuntimeError naming the package if it is not installed."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is not installed (Debian package: ffmpeg)")
    return exe


def make_media(
    path: Path,
    *,
    seconds: float = 3.0,
    size: tuple[int, int] = (160, 120),
    rate: int = 30,
    vcodec: str = "h264",
    acodec: str | None = "aac",
    gop: int | None = None,
    vfr: bool = False,
    sample_rate: int = 48000,
) -> Path:
    """Write a synthetic clip to `path` (container from the suffix) and return the path.

    `gop` is the keyframe interval in frames (default: one per second). `vfr` drops every third
    and fourth frame of each five, so frame durations vary (variable frame rate).
    """
    w, h = size
    args = [
        ffmpeg_path(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={w}x{h}:rate={rate}:duration={seconds}",
    ]
    if acodec is not None:
        args += [
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:beep_factor=4:sample_rate={sample_rate}:duration={seconds}",
        ]
    args += ["-map", "0:v"] + (["-map", "1:a"] if acodec is not None else [])
    if vfr:
        args += ["-vf", r"select='lt(mod(n\,5)\,3)'", "-fps_mode", "vfr"]
    args += _VCODEC_ARGS[vcodec]
    g = gop if gop is not None else rate
    if vcodec in ("h264", "hevc", "mpeg4", "vp9"):
        args += ["-g", str(g)]
    if vcodec == "h264":
        args += ["-keyint_min", str(g), "-sc_threshold", "0"]
    if acodec is not None:
        args += _ACODEC_ARGS[acodec] + ["-ac", "2"]
    args += ["-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact"]
    if acodec is not None:
        args += ["-flags:a", "+bitexact"]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*args, str(path)], check=True)  # noqa: S603 - fixed argument list
    return path


def make_bad(path: Path, kind: BadKind) -> Path:
    """Write an input the packager must refuse with a clear error; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated":
        # moov at the end (ffmpeg's default for mp4): cutting the tail loses the index.
        full = make_media(path.with_name(path.stem + ".full.mp4"), seconds=3)
        data = full.read_bytes()
        full.unlink()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "subtitles_only":
        # A subtitle track and nothing to play: neither video nor audio.
        srt = path.with_name(path.stem + ".srt")
        srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nalone\n")
        _ffmpeg("-i", str(srt), "-c:s", "mov_text", str(path))
        srt.unlink()
    elif kind == "unknown_codec":
        # A Matroska file whose CodecID names no codec libavcodec knows.
        mkv = make_media(path.with_name(path.stem + ".ok.mkv"), seconds=2, acodec=None)
        data = mkv.read_bytes()
        mkv.unlink()
        if b"V_MPEG4/ISO/AVC" not in data:
            raise RuntimeError("unexpected Matroska layout from ffmpeg")
        path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_PEERD/NO/SUCH", 1))
    else:
        raise ValueError(f"unknown bad-media kind {kind!r}")
    return path


def make_truncated_faststart(path: Path) -> Path:
    """An mp4 with its index up front whose media data is cut short (first 40% kept)."""
    full = make_media(path.with_name(path.stem + ".full.mp4"), seconds=6)
    tmp = path.with_name(path.stem + ".fs.mp4")
    subprocess.run(  # noqa: S603 - fixed argument list
        [
            ffmpeg_path(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-y",
            "-i",
            str(full),
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            "-fflags",
            "+bitexact",
            str(tmp),
        ],
        check=True,
    )
    data = tmp.read_bytes()
    full.unlink()
    tmp.unlink()
    path.write_bytes(data[: int(len(data) * 0.4)])
    return path


def export_hls(manifest: Any, blob: Callable[[str], bytes], outdir: Path) -> Path:
    """Write a manifest's playlists and pinned blobs as a plain HLS tree; returns master path.

    Blobs are named ``<cid>.m4s`` / ``<cid>.ts`` (``<cid>.vtt`` for subtitles), playlists
    ``<rendition>.m3u8``, the master ``master.m3u8``; on-demand renditions are left
    out. ffprobe/ffmpeg/nginx can read the tree.
    """
    from peerd.core import playlist
    from peerd.core.manifest import Manifest

    assert isinstance(manifest, Manifest)
    ready = Manifest(
        container=manifest.container,
        renditions=tuple(r for r in manifest.renditions if not r.on_demand),
        version=manifest.version,
    )
    ext = "m4s" if ready.container == "fmp4" else "ts"
    outdir.mkdir(parents=True, exist_ok=True)

    def uri(kind: str, rid: str, ref: str | int | None) -> str:
        if kind == "playlist":
            return f"{rid}.m3u8"
        return f"{ref}.vtt" if kind == "subtitle" else f"{ref}.{ext}"

    text = {s.cid for r in ready.renditions if r.kind == "subtitles" for s in r.segments}
    for cid in ready.blob_cids():
        (outdir / f"{cid}.{'vtt' if cid in text else ext}").write_bytes(blob(cid))
    for r in ready.renditions:
        (outdir / f"{r.id}.m3u8").write_text(playlist.render_media(ready, r.id, uri))
    master = outdir / "master.m3u8"
    master.write_text(playlist.render_master(ready, uri))
    return master


def ffprobe_json(path: Path, *args: str) -> dict[str, Any]:
    """Run Debian's ffprobe on `path` with `-v error -of json` and `args`; raise on any error.

    Anything ffprobe writes to stderr at level error counts as a failure.
    """
    exe = shutil.which("ffprobe")
    if exe is None:
        raise RuntimeError("ffprobe is not installed (Debian package: ffmpeg)")
    res = subprocess.run(  # noqa: S603 - fixed argument list
        [exe, "-v", "error", "-of", "json", *args, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0 or res.stderr.strip():
        raise RuntimeError(f"ffprobe {path} failed ({res.returncode}): {res.stderr.strip()}")
    out: dict[str, Any] = json.loads(res.stdout)
    return out


class MemorySink:
    """A dict of blobs, standing in for the store in the synchronous packager tests."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def __call__(self, data: bytes, kind: str, cid: Cid) -> Cid:
        """Keep ``data`` under ``cid`` (which must be its content id)."""
        assert cid == cid_of(data)  # noqa: S101 -- a test fake: a wrong cid is a packager bug
        self.blobs[cid] = data
        return cid


SRT_CUES = (
    (0.5, 1.5, "Hello <i>world</i>", "Hello world"),
    (2.0, 3.2, "Second & line\ntwo", "Second &amp; line\ntwo"),
    (4.5, 5.5, "Third cue", "Third cue"),
)
"""(start s, end s, SRT text, WebVTT text) of the subtitles `make_multitrack` writes."""

TONES = {"eng": 440, "fra": 880}
"""Frequency (Hz) of the sine tone of each audio track of `make_multitrack`, by language."""


def _srt(path: Path, cues: tuple[tuple[float, float, str, str], ...]) -> Path:
    def stamp(t: float) -> str:
        ms = round(t * 1000)
        return (
            f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
        )

    blocks = [
        f"{i}\n{stamp(a)} --> {stamp(b)}\n{text}\n" for i, (a, b, text, _) in enumerate(cues, 1)
    ]
    path.write_text("\n".join(blocks))
    return path


def make_multitrack(path: Path, *, seconds: float = 6.0, bitmap: bool = True) -> Path:
    """A clip with H.264 video, two AAC tracks (English, then French marked default) playing
    `TONES`, an English text subtitle track with `SRT_CUES` (SRT in Matroska, mov_text in MP4)
    and, with `bitmap`, a DVD (bitmap) subtitle track (Matroska only). Returns the path.

    ffmpeg cannot make bitmap subtitles from text, so the second text track's CodecID is
    rewritten to ``S_VOBSUB`` (the padding kept as an EBML Void): a stream peerd must report as
    skipped, never decoded.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    srt = _srt(path.with_name(path.stem + ".srt"), SRT_CUES)
    mkv = path.suffix == ".mkv"
    args = [
        *("-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=30:duration={seconds}"),
        *(
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={TONES['eng']}:sample_rate=48000:duration={seconds}",
        ),
        *(
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={TONES['fra']}:sample_rate=48000:duration={seconds}",
        ),
        *("-i", str(srt)),
    ]
    args += ["-map", "0:v", "-map", "1:a", "-map", "2:a", "-map", "3:s"]
    if bitmap:
        if not mkv:
            raise ValueError("bitmap subtitles are written to Matroska only")
        args += ["-map", "3:s"]
    args += [*_VCODEC_ARGS["h264"], "-g", "30", *_ACODEC_ARGS["aac"]]
    args += ["-c:s", "srt" if mkv else "mov_text"]
    args += ["-metadata:s:a:0", "language=eng", "-metadata:s:a:1", "language=fra"]
    args += ["-metadata:s:s", "language=eng", "-disposition:s", "0"]
    args += ["-disposition:a:0", "0", "-disposition:a:1", "default"]
    _ffmpeg(*args, str(path))
    srt.unlink()
    if bitmap:
        data = path.read_bytes()
        text_id = b"\x86\x8bS_TEXT/UTF8"
        at = data.rfind(text_id)
        if at < 0 or data.count(text_id) != 2:
            raise RuntimeError("unexpected Matroska layout from ffmpeg")
        vobsub = b"\x86\x88S_VOBSUB" + b"\xec\x81\x00"  # same length: a 3-byte EBML Void
        path.write_bytes(data[:at] + vobsub + data[at + len(text_id) :])
    return path


def make_audio(path: Path, *, seconds: float = 6.0, acodec: str = "aac") -> Path:
    """An audio-only file (a 440 Hz tone; container from the suffix, e.g. .m4a or .mp3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tone = f"sine=frequency=440:sample_rate=48000:duration={seconds}"
    _ffmpeg("-f", "lavfi", "-i", tone, *_ACODEC_ARGS[acodec], str(path))
    return path
