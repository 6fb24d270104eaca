#!/usr/bin/env python3
"""CPU of one RTMP publisher's ingest (peerd.live.rtmp), against ffmpeg doing the same job.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench/rtmp_bench.py [--seconds 20] [--height 720]
        [--bitrate 2500000] [--out /tmp/peerd-bench/rtmp]

1. Encodes a clip (testsrc2 + tone, H.264 CBR ``--bitrate``, AAC 128k) with the ffmpeg CLI.
2. Runs :class:`~peerd.live.rtmp.RtmpService` in this process with a sink that only counts, and
   publishes the clip to it with ``ffmpeg -re -c copy -f flv rtmp://...`` (real time). This
   process's CPU time (its event loop is all it runs) over the publication is the ingest's cost.
3. Anchor, in the same run: ``ffmpeg -listen 1 -i rtmp://... -c copy -f null -``, an RTMP server
   in C receiving the same publication and demuxing it to packets, its CPU time from wait4.

Prints CPU % of one core for each and the ratio peerd / ffmpeg; writes the same as JSON to
``<out>/rtmp_bench.json``. The publisher's own CPU (children's rusage, measured in the
first run) is taken out of the anchor's. Everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from peerd.config import LiveInputSettings, LiveSettings  # noqa: E402
from peerd.core.live import LiveFrame, LiveTrack, Protocol_, Publication  # noqa: E402
from peerd.live.rtmp import RtmpService  # noqa: E402


class CountingSink:
    """A LiveSink that counts frames and bytes."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.ended: str | None = None

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Tracks: ignored."""

    def frame(self, frame: LiveFrame) -> None:
        """Count one frame."""
        self.frames += 1
        self.bytes += len(frame.data)

    def end(self, reason: str) -> None:
        """Remember the reason."""
        self.ended = reason


class OneInput:
    """LiveInputs with one input that takes any key."""

    def __init__(self) -> None:
        self.sink = CountingSink()

    def open(self, key: str, *, input: str | None, protocol: Protocol_, remote: str) -> Publication:
        """Accept."""
        return Publication("bench", protocol, self.sink)


def make_clip(path: Path, seconds: int, height: int, bitrate: int) -> None:
    """The test clip, CBR-ish H.264 + AAC, keyframe every 2 s."""
    width = height * 16 // 9
    rate = 30
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={rate}:duration={seconds}"]
    cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-b:v", str(bitrate)]
    cmd += ["-maxrate", str(bitrate), "-bufsize", str(bitrate), "-g", str(2 * rate)]
    cmd += ["-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k", str(path)]
    subprocess.run(cmd, check=True)  # noqa: S603


async def publish(clip: Path, url: str) -> float:
    """Publish in real time; the publisher's wall time."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-i", str(clip),
        "-c", "copy", "-f", "flv", url,
    )  # fmt: skip
    if await proc.wait() != 0:
        raise SystemExit("ffmpeg publisher failed")
    return time.monotonic() - t0


async def measure_peerd(clip: Path) -> dict[str, float]:
    """This process's CPU while RtmpService takes the publication."""
    inputs = OneInput()
    settings = LiveSettings(rtmp_listen="127.0.0.1:0", inputs=[LiveInputSettings(name="bench")])
    service = RtmpService(settings, inputs)
    ready = asyncio.Event()
    task = asyncio.create_task(service.run(ready.set))
    await ready.wait()
    port = service.addresses["rtmp"][1]
    cpu0, children0 = time.process_time(), children_cpu()
    wall = await publish(clip, f"rtmp://127.0.0.1:{port}/live/key")
    cpu = time.process_time() - cpu0
    publisher = children_cpu() - children0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert inputs.sink.ended == "unpublished", inputs.sink.ended
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "publisher_cpu_s": publisher,
        "frames": inputs.sink.frames,
        "bytes": inputs.sink.bytes,
    }


def free_port() -> int:
    """A free loopback port (for ffmpeg's listener)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Something listens on 127.0.0.1:``port`` (read from /proc: a probe would be ffmpeg's one
    connection)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(
        int(f[1].split(":")[1], 16) == port and f[3] == "0A" for f in (ln.split() for ln in lines)
    )


def children_cpu() -> float:
    """User+system CPU seconds of every reaped child of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


async def measure_ffmpeg(clip: Path, publisher_cpu: float) -> dict[str, float]:
    """ffmpeg's RTMP listener taking the same publication: the children's CPU time less what the
    publisher alone took in the peerd run."""
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/key"
    before = children_cpu()
    listener = await asyncio.create_subprocess_exec(
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-listen", "1", "-i", url,
        "-c", "copy", "-f", "null", "-",
    )  # fmt: skip
    while not listening(port):  # noqa: ASYNC110 - the kernel has no event to wait on
        await asyncio.sleep(0.02)
    wall = await publish(clip, url)
    if await listener.wait() != 0:
        raise SystemExit("ffmpeg listener failed")
    return {"cpu_s": children_cpu() - before - publisher_cpu, "wall_s": wall}


async def main() -> None:
    """Run both measurements and print the ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--bitrate", type=int, default=2_500_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/rtmp"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    clip = a.out / f"clip_{a.height}p_{a.bitrate}.mp4"
    if not clip.exists():
        await asyncio.to_thread(make_clip, clip, a.seconds, a.height, a.bitrate)
    peerd = await measure_peerd(clip)
    ffmpeg = await measure_ffmpeg(clip, peerd["publisher_cpu_s"])
    result = {
        "clip": str(clip),
        "media_mbps": round(peerd["bytes"] * 8 / peerd["wall_s"] / 1e6, 2),
        "peerd_core_pct": round(100 * peerd["cpu_s"] / peerd["wall_s"], 2),
        "ffmpeg_core_pct": round(100 * ffmpeg["cpu_s"] / ffmpeg["wall_s"], 2),
        "ratio_peerd_to_ffmpeg": round(peerd["cpu_s"] / max(ffmpeg["cpu_s"], 1e-6), 2),
        "frames": peerd["frames"],
    }
    print(json.dumps(result, indent=2))
    (a.out / "rtmp_bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
