"""A WHIP publisher (aiortc) in its own process, driven over stdin/stdout, for tests and benches.

Run as ``python -m tests.support.whip_publisher URL MEDIA [--key KEY] [--vcodec h264|vp8]
[--no-audio]``. It plays ``MEDIA`` (looping) through aiortc's ``MediaPlayer``, sends its video
encoded as ``--vcodec`` (H.264 by default: the offer lists H.264 alone) and its sound as Opus,
posts the offer to ``URL`` with ``Authorization: Bearer KEY`` and prints one JSON line
``{"event": "answer", "status": ..., "location": ..., "links": [...], "www_authenticate": ...,
"sdp": ...}``; then it answers commands read from stdin, one per line:

``stats``
    prints ``{"event": "stats", "state": ..., "video_bytes": n, "audio_bytes": n}`` (RTP bytes
    sent so far, the connection state);
``delete``
    sends ``DELETE`` to the session URL, prints ``{"event": "deleted", "status": ...}``, then
    closes the peer connection and exits;
``close``
    closes the peer connection without ``DELETE`` (the node sees DTLS close) and exits.

:class:`PublisherProcess` is the asyncio handle a test uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any
from urllib.parse import urljoin

from tests.support.process import peerd_env


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> int:
    import aiohttp
    from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
    from aiortc.contrib.media import MediaPlayer

    player = MediaPlayer(args.media, loop=True)
    pc = RTCPeerConnection()
    assert player.video is not None
    video = pc.addTransceiver(player.video, direction="sendonly")
    caps = RTCRtpSender.getCapabilities("video")
    assert caps is not None
    want = f"video/{args.vcodec}".lower()
    video.setCodecPreferences([c for c in caps.codecs if c.mimeType.lower() == want])
    if not args.no_audio and player.audio is not None:
        pc.addTransceiver(player.audio, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    async with aiohttp.ClientSession() as http:
        async with http.post(args.url, data=pc.localDescription.sdp, headers=headers) as r:
            body = await r.text()
            location = r.headers.get("Location")
            _emit(
                {
                    "event": "answer",
                    "status": r.status,
                    "location": location,
                    "links": r.headers.getall("Link", []),
                    "www_authenticate": r.headers.get("WWW-Authenticate"),
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
                sent = {"video": 0, "audio": 0}
                for sender in pc.getSenders():
                    if sender.track is None:
                        continue
                    for st in (await sender.getStats()).values():
                        if st.type == "outbound-rtp":
                            sent[sender.track.kind] += st.bytesSent
                _emit(
                    {
                        "event": "stats",
                        "state": pc.connectionState,
                        "video_bytes": sent["video"],
                        "audio_bytes": sent["audio"],
                    }
                )
            elif line == "delete" and location is not None:
                async with http.delete(urljoin(args.url, location), headers=headers) as d:
                    _emit({"event": "deleted", "status": d.status})
                break
            elif line == "close":
                break
    await pc.close()
    _emit({"event": "closed"})
    return 0


class PublisherProcess:
    """A publisher subprocess (see the module doc)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.status = 0
        self.location: str | None = None
        self.links: list[str] = []
        self.www_authenticate: str | None = None
        self.sdp = ""

    @classmethod
    async def start(
        cls, url: str, media: str, *, key: str | None, vcodec: str = "H264", audio: bool = True
    ) -> PublisherProcess:
        """Post an offer to ``url``; returns once the answer (or the refusal) is in."""
        cmd = [sys.executable, "-m", "tests.support.whip_publisher", url, media]
        cmd += ["--vcodec", vcodec] + (["--key", key] if key is not None else [])
        if not audio:
            cmd.append("--no-audio")
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=peerd_env()
        )
        pub = cls(proc)
        answer = await pub._read("answer")
        pub.status = answer["status"]
        pub.location = answer["location"]
        pub.links = answer["links"]
        pub.www_authenticate = answer["www_authenticate"]
        pub.sdp = answer["sdp"]
        return pub

    async def _read(self, event: str, timeout_s: float = 30) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
            if not line:
                code = await self.proc.wait()
                raise RuntimeError(f"publisher exited with {code} before {event!r}")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == event:
                return msg

    async def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stats(self) -> dict[str, Any]:
        """RTP bytes sent so far and the connection state."""
        await self._send("stats")
        return await self._read("stats")

    async def delete(self) -> int:
        """``DELETE`` the session (the status answered), then close and exit."""
        await self._send("delete")
        status: int = (await self._read("deleted"))["status"]
        await self._read("closed", timeout_s=10)
        await self.proc.wait()
        return status

    async def close(self) -> None:
        """Close the peer connection without ``DELETE`` and wait for the process."""
        if self.proc.returncode is None:
            try:
                await self._send("close")
                await self._read("closed", timeout_s=10)
            except (ConnectionError, RuntimeError, TimeoutError):
                self.proc.kill()
            await self.proc.wait()


def main() -> int:
    """Entry point of ``python -m tests.support.whip_publisher``."""
    ap = argparse.ArgumentParser(description="A WHIP publisher driven over stdin/stdout.")
    ap.add_argument("url")
    ap.add_argument("media")
    ap.add_argument("--key", default=None)
    ap.add_argument("--vcodec", default="H264")
    ap.add_argument("--no-audio", action="store_true")
    return asyncio.run(_main(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
