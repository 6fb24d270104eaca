#!/usr/bin/env python3
"""CPU of one live input through the live service and the recorder (no network, no packager).

Publishes ``--seconds`` of a synthetic ``--mbps`` 30 fps H.264 + AAC stream as fast as it goes
into a :class:`~peerd.live.service.LiveService` whose only consumer is the recorder (frames
written and fsynced at every keyframe, as in a daemon), and reports the CPU time of the process
per second of stream (share of a core). The anchor, measured in the same run on the same disk:
writing the same bytes with ``os.write`` and one ``fsync`` per keyframe interval, the least a
crash-safe recording costs; the ratio is the service's and recorder's overhead over it.

    python scripts/bench/live_record_bench.py [--seconds 60] [--mbps 4] [--dir /var/tmp/x]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from prometheus_client import CollectorRegistry  # noqa: E402

from peerd.config import LiveInputSettings, LiveSettings  # noqa: E402
from peerd.core.live import LiveFrame, LiveTrack  # noqa: E402
from peerd.live.record import Recorder  # noqa: E402
from peerd.live.service import LiveService  # noqa: E402

KEY = "bench-key-" + "b" * 20
FPS = 30
GOP = 60


def frames(seconds: int, mbps: float) -> list[LiveFrame]:
    """The stream: video frames of the bitrate, two AAC frames per video frame."""
    video = b"\0" * int(mbps * 1e6 / 8 / FPS)
    audio = b"\0" * 400
    out = []
    for i in range(seconds * FPS):
        out.append(LiveFrame(0, i * 3000, i * 3000, i % GOP == 0, video))
        for j in range(2):
            n = i * 2 + j
            out.append(LiveFrame(1, n * 1024, n * 1024, True, audio))
    return out


async def through_service(d: Path, stream: list[LiveFrame]) -> float:
    """CPU seconds to publish ``stream`` into the service and its recorder, sealed on disk."""
    inputs = [LiveInputSettings(name="cam")]
    rec = Recorder(d, None, inputs)  # type: ignore[arg-type]  # sealed, never ingested
    rec.stopping = True
    svc = LiveService(
        LiveSettings(inputs=inputs),
        secret={"live-cam.key": KEY}.get,
        recorder=rec,
        registry=CollectorRegistry(),
    )
    svc.load_keys()
    t0 = time.process_time()
    pub = svc.open(KEY, input=None, protocol="rtmp", remote="192.0.2.1:5000")
    tracks = [
        LiveTrack(0, "video", "h264", 90000, bytes.fromhex("01640028"), 1280, 720),
        LiveTrack(1, "audio", "aac", 48000, bytes([0x11, 0x90]), sample_rate=48000, channels=2),
    ]
    pub.sink.begin(tracks)
    for i, f in enumerate(stream):
        pub.sink.frame(f)
        if i % 90 == 0:
            await asyncio.sleep(0)  # let the writer run, as a real publisher's pacing would
    pub.sink.end("unpublished")
    await rec.flush()
    await rec.wait()
    return time.process_time() - t0


def anchor(d: Path, stream: list[LiveFrame]) -> float:
    """CPU seconds to write the same bytes with one fsync per keyframe interval."""
    t0 = time.process_time()
    fd = os.open(d / "anchor.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk: list[bytes] = []
        for f in stream:
            if f.track == 0 and f.keyframe and chunk:
                os.write(fd, b"".join(chunk))
                os.fsync(fd)
                chunk.clear()
            chunk.append(f.data)
        os.write(fd, b"".join(chunk))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the bench and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--mbps", type=float, default=4.0)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="live-bench-", dir=args.dir))
    try:
        stream = frames(args.seconds, args.mbps)
        (base / "svc").mkdir()
        svc = asyncio.run(through_service(base / "svc", stream))
        raw = anchor(base, stream)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = {
        "stream_s": args.seconds,
        "mbps": args.mbps,
        "service_cpu_s": round(svc, 3),
        "service_core_share": round(svc / args.seconds, 5),
        "anchor_cpu_s": round(raw, 3),
        "ratio_to_anchor": round(svc / raw, 2) if raw > 0 else None,
    }
    print(out)
    return out


if __name__ == "__main__":
    main()
