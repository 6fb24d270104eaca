#!/usr/bin/env python3
"""CPU per WHEP passthrough session, measured on a real daemon.

    .venv/bin/python scripts/bench/whep_bench.py [--sessions 10] [--seconds 10]
        [--height 720] [--bitrate 2500000] [--bframes 0] [--out /tmp/peerd-bench/whep]

1. Encodes a clip (testsrc2 + tone, H.264 High without B-frames, CBR ``--bitrate``, AAC) to fMP4
   HLS, stores it in a fresh node and starts ``peerd run`` (loop playback on).
2. Measures the idle daemon's CPU for a few seconds (baseline).
3. Starts ``--sessions`` aiortc viewers in a *separate process* (this script with ``--client``);
   they receive RTP but do not decode (a null decoder), so the viewers' cost stays out of the
   daemon's numbers. Once every viewer is connected and a warm-up has passed, the daemon's CPU
   time (utime+stime from /proc/<pid>/stat) is sampled over ``--seconds``.
4. Anchor, in the same run: one ``ffmpeg -re`` sending the same stream as plain RTP (video
   copied, audio encoded to Opus: the same per-viewer work without ICE/DTLS/SRTP, in C), its CPU
   measured the same way.

Prints CPU % of one core per session (above the idle baseline), the projected passthrough
sessions per core, the ratio to the ffmpeg anchor, and what the viewers received; writes the same
as JSON to ``<out>/whep_bench.json``. Every socket is on 127.0.0.1 (plus the node's own host
candidates, which the kernel delivers locally); nothing reaches a STUN server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sample_cpu(pid: int, seconds: float) -> float:
    """CPU % of one core used by ``pid`` over the next ``seconds``."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return 100.0 * (c1 - c0) / (t1 - t0)


# -- viewers (child process) -------------------------------------------------------------------


async def run_viewers(url: str, n: int, seconds: float) -> dict[str, Any]:
    import aiohttp
    import aiortc.rtcrtpreceiver as receiver
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.codecs.base import Decoder

    video_decoders: list[NullDecoder] = []

    class NullDecoder(Decoder):
        def __init__(self) -> None:
            self.bytes = 0
            self.frames = 0

        def decode(self, encoded_frame: Any) -> list[Any]:
            self.bytes += len(encoded_frame.data)
            self.frames += 1
            return []

    def get_decoder(codec: Any) -> NullDecoder:
        d = NullDecoder()
        if codec.mimeType.lower().startswith("video/"):
            video_decoders.append(d)
        return d

    # Receive and reassemble RTP, never decode: the viewers' CPU is not what is measured.
    receiver.get_decoder = get_decoder
    # Offer the H.264 profiles a browser with a hardware decoder offers (aiortc's own offer has
    # Constrained Baseline only), so a High stream without B-frames is passed through, not
    # transcoded to VP8: the figure is the passthrough one.
    from tests.support.whep_viewer import DECODES, offer_h264

    offer_h264(DECODES)

    pcs: list[RTCPeerConnection] = []
    locations: list[str] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(
                url,
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"WHEP answered {r.status}: {await r.text()}")
                answer = await r.text()
                locations.append(str(r.url.join(r.url.__class__(r.headers["Location"]))))
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            pcs.append(pc)
        deadline = time.monotonic() + 20
        while any(pc.connectionState != "connected" for pc in pcs):
            if time.monotonic() > deadline:
                raise RuntimeError("viewers did not connect")
            await asyncio.sleep(0.1)
        # A video receiver's decoder exists from its first frame: wait for every viewer's.
        while len(video_decoders) < n:
            if time.monotonic() > deadline + 20:
                raise RuntimeError(f"{len(video_decoders)} of {n} viewers received video")
            await asyncio.sleep(0.1)
        print("CONNECTED", flush=True)
        await asyncio.sleep(1)
        t0 = time.monotonic()
        before = [await _received(pc) for pc in pcs]
        vb0 = [(d.bytes, d.frames) for d in video_decoders]
        await asyncio.sleep(seconds)
        after = [await _received(pc) for pc in pcs]
        vb1 = [(d.bytes, d.frames) for d in video_decoders]
        elapsed = time.monotonic() - t0
        for loc in locations:
            async with http.delete(f"{loc}?{url.partition('?')[2]}") as r:
                assert r.status == 200, r.status
    for pc in pcs:
        await pc.close()
    video_pkts = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    audio_pkts = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    if len(vb1) != n:
        raise RuntimeError(f"{len(vb1)} video receivers for {n} viewers")
    return {
        "seconds": elapsed,
        "video_packets_per_s": [p / elapsed for p in video_pkts],
        "video_mbit_per_s": [
            8 * (b1 - b0) / elapsed / 1e6 for (b0, _), (b1, _) in zip(vb0, vb1, strict=True)
        ],
        "video_frames_per_s": [
            (f1 - f0) / elapsed for (_, f0), (_, f1) in zip(vb0, vb1, strict=True)
        ],
        "audio_packets_per_s": [p / elapsed for p in audio_pkts],
    }


async def _received(pc: Any) -> tuple[int, int]:
    stats = await pc.getStats()
    v = a = 0
    for s in stats.values():
        if s.type == "inbound-rtp":
            if s.kind == "video":
                v = s.packetsReceived
            else:
                a = s.packetsReceived
    return v, a


# -- orchestration -------------------------------------------------------------------------------


def ffmpeg_anchor(clip_mp4: Path, seconds: float) -> float:
    """CPU % of one ffmpeg sending the clip as RTP (video copy + Opus), real-time paced."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    port = sink.getsockname()[1]
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1"]
    cmd += ["-i", str(clip_mp4), "-map", "0:v", "-c:v", "copy", "-f", "rtp"]
    cmd += [f"rtp://127.0.0.1:{port}", "-map", "0:a", "-c:a", "libopus", "-b:a", "96k"]
    cmd += ["-ar", "48000", "-f", "rtp", f"rtp://127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        time.sleep(2)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        end = t0 + seconds
        got = 0
        while time.monotonic() < end:
            try:
                while True:
                    got += len(sink.recv(65536))
            except BlockingIOError:
                time.sleep(0.01)
        pct = 100.0 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        if got == 0:
            raise RuntimeError("ffmpeg anchor sent nothing")
        return pct
    finally:
        proc.terminate()
        proc.wait(10)
        sink.close()


async def prepare(out: Path, height: int, bitrate: int, bframes: int) -> tuple[Path, str, Path]:
    from peerd.config import load_settings
    from peerd.runtime import open_runtime
    from tests.support.whep_media import add_media, make_hls, sign_viewers

    width = height * 16 // 9 // 2 * 2
    clip = await asyncio.to_thread(
        make_hls,
        out / "clip",
        seconds=6,
        width=width,
        height=height,
        bframes=bframes,
        video_bitrate=bitrate,
    )
    state = out / "node"
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media_id = await add_media(rt, clip)
    finally:
        await rt.close()
    sign_viewers(state)
    whole = out / "clip.mp4"
    with whole.open("wb") as f:
        for part in (clip.init, *clip.segments):
            f.write(part.read_bytes())
    return state, media_id, whole


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--bitrate", type=int, default=2_500_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/whep"))
    ap.add_argument(
        "--bframes",
        type=int,
        default=0,
        help="B-frames in the clip; > 0 makes the node transcode (per-session encoder cost)",
    )
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.client:
        result = asyncio.run(run_viewers(args.client, args.sessions, args.seconds))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from tests.support.process import PeerdProcess
    from tests.support.whep_media import whep_url

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    state, media_id, whole = asyncio.run(prepare(args.out, args.height, args.bitrate, args.bframes))
    node = PeerdProcess(
        state,
        config={
            "log": {"level": "info"},
            "webrtc": {"loop_playback": True, "max_sessions": args.sessions + 2},
        },
    )
    node.start()
    assert node.proc is not None
    pid = node.proc.pid
    try:
        time.sleep(1)
        idle = sample_cpu(pid, 3)
        client = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                whep_url(node.base_url, media_id),
                "--sessions",
                str(args.sessions),
                "--seconds",
                str(args.seconds + 3),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        line = client.stdout.readline()
        if not line.startswith("CONNECTED"):
            client.wait(30)
            raise RuntimeError(f"viewers failed: {line}")
        time.sleep(2)  # warm-up: first segments read, pacing settled
        busy = sample_cpu(pid, args.seconds)
        rest = client.communicate(timeout=120)[0]
        viewers = json.loads(rest.split("RESULT ", 1)[1])
    finally:
        node.stop()
    anchor = ffmpeg_anchor(whole, min(args.seconds, 8.0))
    per_session = (busy - idle) / args.sessions
    result = {
        "sessions": args.sessions,
        "height": args.height,
        "video_bitrate": args.bitrate,
        "mode": "transcode" if args.bframes else "passthrough",
        "daemon_cpu_idle_pct": round(idle, 2),
        "daemon_cpu_busy_pct": round(busy, 2),
        "cpu_pct_per_session": round(per_session, 2),
        "sessions_per_core": round(100.0 / per_session, 1) if per_session > 0 else None,
        "ffmpeg_rtp_cpu_pct_per_stream": round(anchor, 2),
        # The anchor copies video: a ratio only for passthrough.
        "ratio_to_ffmpeg": round(per_session / anchor, 1)
        if anchor > 0 and not args.bframes
        else None,
        "viewer_video_mbit_per_s_min": round(min(viewers["video_mbit_per_s"]), 2),
        "viewer_video_packets_per_s_min": round(min(viewers["video_packets_per_s"]), 1),
        "viewer_video_frames_per_s_min": round(min(viewers["video_frames_per_s"]), 1),
        "viewer_audio_packets_per_s_min": round(min(viewers["audio_packets_per_s"]), 1),
    }
    (args.out / "whep_bench.json").write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:34} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
