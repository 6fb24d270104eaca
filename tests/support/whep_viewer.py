"""A WHEP viewer (aiortc) in its own process, driven over stdin/stdout, for tests and benches.

Run as ``python -m tests.support.whep_viewer URL [--no-audio] [--header K:V] [--offer-only]
[--h264 PROFILES]``. It creates a receive-only peer connection, posts its offer to ``URL`` and
prints one JSON line
``{"event": "answer", "status": ..., "location": ..., "retry_after": ..., "links": [...],
"sdp": ...}``; then it
decodes what it receives and answers commands read from stdin, one per line:

``stats``
    prints ``{"event": "stats", "video": n, "audio": n, "widths": [...], "tone": hz,
    "state": ...}`` (frames decoded so far, video frame widths seen, the dominant frequency of
    the last second of sound received (0 before any), the connection state);
``close``
    closes the peer connection (the node sees DTLS close) and exits.

The offer lists H.264 in aiortc's profiles (Constrained Baseline, Baseline) and in those of
``--h264`` (comma-separated ``profile-level-id``s, default :data:`DECODES`, what aiortc's
libavcodec decoder takes, as a browser with a hardware decoder offers them; ``--h264 ""`` offers
aiortc's own only).

``--offer-only`` prints ``{"event": "offer", "sdp": ...}`` and exits (an offer for tests that
post it themselves). Keeping aiortc's viewer side out of the test process keeps the test's
event loop (and its loop-blocking guard) to the node's own work.

:class:`ViewerProcess` is the asyncio handle a test uses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
from typing import Any

from tests.support.process import peerd_env

DECODES = "4d001f,640c1f,64001f"


def offer_h264(profiles: str) -> None:
    """Add the H.264 ``profiles`` to aiortc's codec table, so the offer lists them."""
    from aiortc.codecs import CODECS
    from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters

    video = CODECS["video"]
    pt = max(c.payloadType or 0 for c in video) + 1
    for pli in filter(None, profiles.split(",")):
        feedback = [RTCRtcpFeedback(type="nack"), RTCRtcpFeedback(type="nack", parameter="pli")]
        params = {"level-asymmetry-allowed": "1", "packetization-mode": "1"}
        video.append(
            RTCRtpCodecParameters(
                mimeType="video/H264",
                clockRate=90000,
                payloadType=pt,
                rtcpFeedback=feedback,
                parameters={**params, "profile-level-id": pli},
            )
        )
        pt += 1


async def _make_pc(video: bool, audio: bool) -> Any:
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    if video:
        pc.addTransceiver("video", direction="recvonly")
    if audio:
        pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


class ToneMeter:
    """The frequency of a tone from its decoded samples: upward zero crossings per second.

    A crossing counts only from below ``-floor`` to above ``floor``, so codec noise around zero
    adds none; silent frames are left out. Kept over the last ``frames`` frames with sound.
    """

    def __init__(self, floor: int = 500, frames: int = 50) -> None:
        self.floor = floor
        self._last: collections.deque[tuple[int, int]] = collections.deque(maxlen=frames)
        self._rate = 48000
        self._low = False

    def add(self, frame: Any) -> None:
        """Count one ``av.AudioFrame`` (s16, interleaved: the first channel is read)."""
        channels = len(frame.layout.channels)
        pcm = memoryview(bytes(frame.planes[0])).cast("h")[: frame.samples * channels]
        samples = pcm[::channels].tolist()
        if max(map(abs, samples), default=0) < self.floor:
            return
        self._rate = frame.sample_rate
        ups = 0
        for x in samples:
            if x < -self.floor:
                self._low = True
            elif x > self.floor and self._low:
                self._low = False
                ups += 1
        self._last.append((ups, len(samples)))

    def hz(self) -> float:
        """The tone's frequency over the frames kept; 0.0 before any sound."""
        n = sum(s for _, s in self._last)
        return sum(u for u, _ in self._last) * self._rate / n if n else 0.0


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> int:
    import aiohttp
    import av
    from aiortc import MediaStreamTrack, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    offer_h264(args.h264)
    pc = await _make_pc(not args.no_video, not args.no_audio)
    if args.offer_only:
        _emit({"event": "offer", "sdp": pc.localDescription.sdp})
        await pc.close()
        return 0
    counts = {"video": 0, "audio": 0}
    widths: set[int] = set()
    tone = ToneMeter()
    tasks: list[asyncio.Task[None]] = []

    async def consume(track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            counts[track.kind] += 1
            if isinstance(frame, av.VideoFrame):
                widths.add(frame.width)
            elif isinstance(frame, av.AudioFrame):
                tone.add(frame)

    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(consume(t))))
    headers = {"Content-Type": "application/sdp"}
    for h in args.header:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    async with (
        aiohttp.ClientSession() as http,
        http.post(args.url, data=pc.localDescription.sdp, headers=headers) as r,
    ):
        body = await r.text()
        _emit(
            {
                "event": "answer",
                "status": r.status,
                "location": r.headers.get("Location"),
                "retry_after": r.headers.get("Retry-After"),
                "links": r.headers.getall("Link", []),
                "sdp": body,
            }
        )
    if r.status == 201:
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "stats":
            _emit(
                {
                    "event": "stats",
                    "video": counts["video"],
                    "audio": counts["audio"],
                    "widths": sorted(widths),
                    "tone": tone.hz(),
                    "state": pc.connectionState,
                }
            )
        elif line == "close":
            break
    await pc.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    _emit({"event": "closed"})
    return 0


class ViewerProcess:
    """A viewer subprocess (see the module doc)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.status = 0
        self.location: str | None = None
        self.retry_after: str | None = None
        self.links: list[str] = []
        self.sdp = ""

    @classmethod
    async def start(
        cls,
        url: str,
        *,
        audio: bool = True,
        headers: dict[str, str] | None = None,
        h264: str = DECODES,
    ) -> ViewerProcess:
        """Post an offer to ``url``; returns once the answer (or the refusal) is in."""
        cmd = [sys.executable, "-m", "tests.support.whep_viewer", url, "--h264", h264]
        if not audio:
            cmd.append("--no-audio")
        for k, v in (headers or {}).items():
            cmd += ["--header", f"{k}: {v}"]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=peerd_env(),
        )
        viewer = cls(proc)
        answer = await viewer._read("answer")
        viewer.status = answer["status"]
        viewer.location = answer["location"]
        viewer.retry_after = answer["retry_after"]
        viewer.links = answer["links"]
        viewer.sdp = answer["sdp"]
        return viewer

    async def _read(self, event: str, timeout_s: float = 30) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
            if not line:
                code = await self.proc.wait()
                raise RuntimeError(f"viewer exited with {code} before {event!r}")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == event:
                return msg

    async def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stats(self) -> dict[str, Any]:
        """Frames decoded so far, frame widths seen, connection state."""
        await self._send("stats")
        return await self._read("stats")

    async def close(self) -> None:
        """Close the peer connection (DTLS close to the node) and wait for the process."""
        if self.proc.returncode is None:
            try:
                await self._send("close")
                await self._read("closed", timeout_s=10)
            except (ConnectionError, RuntimeError, TimeoutError):
                self.proc.kill()
            await self.proc.wait()


async def make_offer(*, audio: bool = True) -> str:
    """An SDP offer from a (closed) aiortc viewer in a subprocess."""
    cmd = [sys.executable, "-m", "tests.support.whep_viewer", "-", "--offer-only"]
    if not audio:
        cmd.append("--no-audio")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, env=peerd_env()
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"viewer exited with {proc.returncode}")
    sdp: str = json.loads(out)["sdp"]
    return sdp


def main() -> int:
    """Entry point of ``python -m tests.support.whep_viewer``."""
    ap = argparse.ArgumentParser(description="A WHEP viewer driven over stdin/stdout.")
    ap.add_argument("url")
    ap.add_argument("--no-audio", action="store_true")
    ap.add_argument("--no-video", action="store_true")
    ap.add_argument("--offer-only", action="store_true")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--h264", default=DECODES)
    return asyncio.run(_main(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
