"""A clip a live publisher could send: H.264 without B-frames (WebRTC passes it through) + AAC.

``make_live_clip`` writes an MP4 for :func:`tests.support.livefeed.feed`: a test pattern in the
H.264 profile asked for (Main or Constrained Baseline: profiles every browser's WebRTC decodes),
a keyframe a second, no B-frames (as OBS sends over RTMP/WHIP for low latency), and a 440 Hz
tone as AAC (as an RTMP publisher sends) at 44.1 kHz, so the WHEP fan-out has to resample too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.media import ffmpeg_path

TONE_HZ = 440


def make_live_clip(
    path: Path,
    *,
    seconds: float = 20.0,
    size: tuple[int, int] = (320, 240),
    fps: int = 25,
    profile: str = "main",
    video_bitrate: int | None = None,
) -> Path:
    """Write the clip to ``path`` (blocking; needs ffmpeg) and return it."""
    w, h = size
    cmd = [ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    cmd += ["-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate={fps}:duration={seconds}"]
    cmd += ["-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}:sample_rate=44100:duration={seconds}"]
    cmd += ["-map", "0:v", "-map", "1:a"]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-threads", "1"]
    cmd += ["-profile:v", profile, "-bf", "0", "-g", str(fps), "-keyint_min", str(fps)]
    cmd += ["-sc_threshold", "0"]
    if video_bitrate is not None:
        rate = str(video_bitrate)
        cmd += ["-b:v", rate, "-minrate", rate, "-maxrate", rate, "-bufsize", rate]
        cmd += ["-x264-params", "nal-hrd=cbr"]
    cmd += ["-c:a", "aac", "-b:a", "96k", "-ac", "2", "-map_metadata", "-1", str(path)]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, timeout=300)  # noqa: S603 - fixed argument list
    return path
