#!/usr/bin/env python3
"""Glass-to-glass latency of live streaming (LL-HLS, WHEP), and CPU per live input and viewer.

    .venv/bin/python scripts/bench/live_latency.py [--anchor-only] [--seconds 20]
        [--cpu-seconds 10] [--viewers 8] [--out /tmp/peerd-bench/live]
    .venv/bin/python scripts/bench/live_latency.py --peerd http://HOST:PORT \\
        --rtmp rtmp://HOST:1935/live/KEY --hls-token T --whep-token T [--input bench] [--pid PID]

**Publisher.** A child process (this script with ``--publish URL``) draws 640x360 frames
(``--size``) at 30 fps, paints into each the wall-clock time in ms at the moment it is drawn
(the block code of ``scripts/bench/stamp.py``), encodes it at once with libx264 (Constrained
Baseline, zerolatency, keyframe every second, 800 kbit/s: ``--bitrate``) plus a 375 Hz AAC
tone, and sends it over RTMP (PyAV's FLV muxer, flushed after every packet). The time is taken
before drawing and encoding, as a camera's would be: "glass" is the picture entering the
encoder.

**Readers**, each its own process so their decoding never delays the publisher or the server:

* HLS (``--read-hls``): one reader for LL-HLS and plain HLS. When the playlist offers blocking
  reload and parts (``CAN-BLOCK-RELOAD=YES``, ``EXT-X-PART``) it starts at the newest
  independent part and asks for each next one with ``_HLS_msn``/``_HLS_part`` (a low-latency
  client); otherwise it polls the playlist every 100 ms (more eagerly than a player's reload of a
  target duration: the anchor's best case) and fetches each new segment, starting at the newest.
  Every part or segment is decoded with PyAV as soon as it arrives.
* WHEP (``--read-whep``): an aiortc viewer (its jitter buffer and decoder, as a viewer has them).
* hls.js in headless Chromium (``--read-browser``; off with ``--no-browser``): what a viewer
  sees. hls.js in low-latency mode (parts and blocking reload when offered, else a plain live
  client 3 target durations behind) plays into a ``<video>``; each presented frame
  (``requestVideoFrameCallback``) is drawn on a canvas and read by a JS copy of the block
  decoder; latency = the frame's expected display time on the wall clock - its painted time.
  For WHEP, the same reader runs in the node's own WHEP player page
  (``/whep/live/player/<input>``, Chromium's WebRTC stack and jitter buffer).

For the other readers, latency = wall clock at decode - the time painted in the frame. Reported
per path as p50/p95/max over ``--seconds`` (after a warm-up). A frame of an HLS segment or part
waits for the last frame of it, so those readers' ages spread over a part's (or segment's)
duration; a player that never stalls has to hold at least their max. hls.js holds a steady
delay behind the live edge, so its ages hardly spread.

**Anchor, in the same run**: the ffmpeg CLI receiving the same RTMP (``-listen 1``) and
packaging it with ``-c copy`` into plain HLS with 1 s segments (MPEG-TS), served from its
directory by the standard library's HTTP server (with CORS: ``--serve-dir``), read by the same
HLS reader and hls.js. Debian's ffmpeg 5.1 cannot
write LL-HLS parts, and MediaMTX (which would anchor both LL-HLS and WHEP) is not installed and
not obtainable from the package registries here (no Debian, PyPI or npm package ships its binary;
its Go module has no version the proxy offers), so WHEP has no anchor.

**CPU**, from ``/proc/<pid>/stat`` of the serving process and its children (utime + stime) over
the steady phase, as % of one core: the idle daemon; the daemon with the input publishing and no
viewer (passthrough cost of one live input = that minus idle); the daemon with ``--viewers``
WHEP viewers (receive-only, no decoding: ``scripts/bench/whep_bench.py --client``), per viewer =
(that minus the input alone) / viewers, and viewers per core. For the anchor: ffmpeg (ingest +
HLS packaging) plus its HTTP server over the same phase.

Without ``--peerd`` and ``--anchor-only`` the bench starts ``peerd run`` from this checkout with
a generated config (``[live] inputs = [{name = "bench"}]``, its key in
``<state>/secrets/live-bench.key``, ``rtmp_listen`` on a free port, viewer tokens for media id
``live:bench`` signed with the test viewer key of ``tests/support/whep_media.py``). Results
print as a table with the ratios peerd/anchor and the goals of issue 22, and go to
``<out>/live_latency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.bench import stamp  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
AUDIO_RATE = 48_000
AUDIO_SAMPLES = 1024
GOALS = {"llhls_s": 3.0, "whep_s": 0.5, "input_core_pct": 10.0, "viewers_per_core": 16.0}


def now_ms() -> float:
    """Wall-clock time in ms (the clock the publisher paints)."""
    return time.time_ns() / 1e6


# -- publisher (child process) -------------------------------------------------------------------


def _tone_frame_bytes() -> bytes:
    """One AAC input frame of a 375 Hz tone, planar float stereo (48 kHz / 375 = 128 samples a
    period, so every 1024-sample frame is the same)."""
    mono = array("f", (0.2 * math.sin(2 * math.pi * i / 128) for i in range(AUDIO_SAMPLES)))
    return mono.tobytes()


def publish(url: str, seconds: float, width: int, height: int, bitrate: int) -> int:
    """Publish stamped video (and a tone) to ``url`` over RTMP in real time for ``seconds``."""
    import av

    stop = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = time.monotonic() + 30
    while True:
        out = av.open(url, "w", format="flv", container_options={"flush_packets": "1"})
        video = out.add_stream("libx264", rate=stamp.FPS)
        stamp.configure(video.codec_context, width, height, bitrate)
        video.codec_context.time_base = Fraction(1, stamp.FPS)
        audio = out.add_stream("aac", rate=AUDIO_RATE)
        audio.codec_context.layout = "stereo"
        audio.codec_context.bit_rate = 96_000
        try:
            out.start_encoding()  # connects, RTMP handshake and publish, FLV header
            break
        except OSError:
            # The anchor's ffmpeg listens only once it has started; peerd's listener too.
            with contextlib.suppress(Exception):
                out.close()
            if time.monotonic() > deadline or stop:
                raise
            time.sleep(0.2)
    tone = _tone_frame_bytes()
    canvas = stamp.Canvas(width, height)
    t0 = time.monotonic()
    tick = 0
    audio_n = 0
    dropped = 0
    started = False
    while not stop and time.monotonic() - t0 < seconds:
        due = t0 + tick / stamp.FPS
        lag = time.monotonic() - due
        if lag < 0:
            time.sleep(-lag)
        elif lag > 1 / stamp.FPS:
            # Behind (a busy machine): skip to the current tick so the stream stays real time.
            skip = int(lag * stamp.FPS)
            dropped += skip
            tick += skip
        ms = time.time_ns() // 1_000_000
        frame = canvas.frame(ms, tick)
        frame.pts = tick
        frame.time_base = Fraction(1, stamp.FPS)
        for packet in video.encode(frame):
            out.mux(packet)
        # Audio up to the end of this video frame, so the muxer's interleaving never waits.
        while audio_n * AUDIO_SAMPLES <= (tick + 1) * AUDIO_RATE // stamp.FPS:
            af = av.AudioFrame(format="fltp", layout="stereo", samples=AUDIO_SAMPLES)
            for plane in af.planes:
                plane.update(tone)
            af.sample_rate = AUDIO_RATE
            af.pts = audio_n * AUDIO_SAMPLES
            af.time_base = Fraction(1, AUDIO_RATE)
            for packet in audio.encode(af):
                out.mux(packet)
            audio_n += 1
        if not started:
            print("PUBLISHING", flush=True)
            started = True
        tick += 1
    out.close()
    print(json.dumps({"event": "published", "frames": tick, "dropped": dropped}), flush=True)
    return 0


# -- HLS reader (child process) ------------------------------------------------------------------


@dataclass
class Part:
    """One ``EXT-X-PART`` (or a whole segment, for plain HLS)."""

    uri: str
    independent: bool
    byterange: tuple[int, int] | None = None  # (offset, length)


@dataclass
class Playlist:
    """What the reader needs of a media playlist."""

    media_sequence: int = 0
    segments: dict[int, str] = field(default_factory=dict)  # msn -> uri
    parts: dict[tuple[int, int], Part] = field(default_factory=dict)  # (msn, index) -> part
    map_uri: str | None = None
    can_block: bool = False
    ended: bool = False

    @property
    def next_msn(self) -> int:
        """The media sequence number of the segment after the last complete one."""
        return self.media_sequence + len(self.segments)


def _attrs(value: str) -> dict[str, str]:
    """The attribute list of a tag (``A=1,B="x,y"``)."""
    out: dict[str, str] = {}
    key, buf, quoted = "", "", False
    for ch in value + ",":
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and not quoted and not key:
            key, buf = buf, ""
        elif ch == "," and not quoted:
            if key:
                out[key.strip()] = buf
            key, buf = "", ""
        else:
            buf += ch
    return out


def _byterange(value: str | None, last_end: int) -> tuple[int, int] | None:
    if not value:
        return None
    length, _, offset = value.partition("@")
    return (int(offset) if offset else last_end, int(length))


def parse_playlist(text: str) -> Playlist:
    """Parse a media playlist: segments, parts (attached to their segment's msn), the init."""
    pl = Playlist()
    pending: list[Part] = []
    in_segment = False
    last_end = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            pl.media_sequence = int(line.split(":", 1)[1])
        elif line.startswith("#EXT-X-SERVER-CONTROL:"):
            pl.can_block = _attrs(line.split(":", 1)[1]).get("CAN-BLOCK-RELOAD") == "YES"
        elif line.startswith("#EXT-X-SKIP:"):
            # A delta update: the skipped segments still count for the next ones' numbers.
            pl.media_sequence += int(_attrs(line.split(":", 1)[1])["SKIPPED-SEGMENTS"])
        elif line.startswith("#EXT-X-MAP:"):
            pl.map_uri = _attrs(line.split(":", 1)[1])["URI"]
        elif line.startswith("#EXT-X-PART:"):
            a = _attrs(line.split(":", 1)[1])
            br = _byterange(a.get("BYTERANGE"), last_end)
            if br is not None:
                last_end = br[0] + br[1]
            pending.append(Part(a["URI"], a.get("INDEPENDENT") == "YES", br))
        elif line.startswith("#EXTINF:"):
            in_segment = True
        elif line.startswith("#EXT-X-ENDLIST"):
            pl.ended = True
        elif line and not line.startswith("#") and in_segment:
            msn = pl.next_msn
            pl.segments[msn] = line
            for i, p in enumerate(pending):
                pl.parts[(msn, i)] = p
            pending, in_segment, last_end = [], False, 0
    msn = pl.next_msn
    for i, p in enumerate(pending):
        pl.parts[(msn, i)] = p
    return pl


class FrameClock:
    """Decodes what a reader receives and records each frame's age (now - painted time)."""

    def __init__(self) -> None:
        self._decoder: Any = None
        self.latencies: list[float] = []
        self.unreadable = 0
        self.recording = False

    def feed(self, data: bytes, init: bytes | None) -> int:
        """Decode a part or segment (fMP4 with its init, or MPEG-TS); returns frames decoded."""
        import av

        fmt = "mpegts" if data[:1] == b"\x47" else "mp4"
        n = 0
        with av.open(io.BytesIO((init or b"") + data), "r", format=fmt) as src:
            vs = src.streams.video[0]
            if self._decoder is None:
                self._decoder = av.CodecContext.create("h264", "r")
                if vs.codec_context.extradata:
                    self._decoder.extradata = vs.codec_context.extradata
                # One thread: frame threads hold frames back until more packets come.
                self._decoder.thread_count = 1
            for packet in src.demux(vs):
                if packet.size == 0:
                    continue
                for frame in self._decoder.decode(packet):
                    self.frame(frame)
                    n += 1
        return n

    def frame(self, frame: Any) -> None:
        """Record one decoded frame's age."""
        t = now_ms()
        painted = stamp.read_frame(frame)
        if not self.recording:
            return
        if painted is None:
            self.unreadable += 1
        else:
            self.latencies.append(t - painted)


def _with_query(url: str, extra: dict[str, str]) -> str:
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qsl(parts.query)
    q = [(k, v) for k, v in q if k not in extra] + list(extra.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


def _resolve(base: str, uri: str) -> str:
    """``uri`` against the playlist URL, carrying its ``token`` if the URI has none."""
    url = urllib.parse.urljoin(base, uri)
    token = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(base).query)).get("token")
    if token and "token=" not in urllib.parse.urlsplit(url).query:
        url = _with_query(url, {"token": token})
    return url


async def read_hls(url: str, seconds: float, warmup: float, poll_s: float) -> dict[str, Any]:
    """Follow a live HLS playlist (see the module doc); the ages of the frames decoded."""
    import aiohttp

    clock = FrameClock()
    inits: dict[str, bytes] = {}
    requests = 0
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def get(u: str, rng: tuple[int, int] | None = None) -> bytes:
            nonlocal requests
            requests += 1
            headers = {"Range": f"bytes={rng[0]}-{rng[0] + rng[1] - 1}"} if rng else {}
            async with http.get(u, headers=headers) as r:
                if r.status not in (200, 206):
                    raise RuntimeError(f"GET {u} answered {r.status}")
                return await r.read()

        async def load(params: dict[str, str] | None = None) -> Playlist:
            return parse_playlist((await get(_with_query(url, params or {}))).decode())

        async def init_of(pl: Playlist) -> bytes | None:
            if pl.map_uri is None:
                return None
            u = _resolve(url, pl.map_uri)
            if u not in inits:
                inits[u] = await get(u)
            return inits[u]

        async def take(pl: Playlist, uri: str, rng: tuple[int, int] | None) -> None:
            data = await get(_resolve(url, uri), rng)
            clock.feed(data, await init_of(pl))

        pl = await load()
        blocking = pl.can_block and bool(pl.parts)
        t0 = time.monotonic()
        start_at = t0 + warmup
        end_at = start_at + seconds
        if blocking:
            starts = [k for k, p in pl.parts.items() if p.independent] or [(pl.next_msn, 0)]
            msn, idx = max(starts)
            while time.monotonic() < end_at:
                clock.recording = time.monotonic() >= start_at
                part = pl.parts.get((msn, idx))
                if part is not None:
                    await take(pl, part.uri, part.byterange)
                    idx += 1
                elif msn < pl.next_msn:
                    if idx == 0:  # the segment's parts are no longer listed: take it whole
                        await take(pl, pl.segments[msn], None)
                    msn, idx = msn + 1, 0
                elif pl.ended:
                    break
                else:
                    pl = await load({"_HLS_msn": str(msn), "_HLS_part": str(idx)})
        else:
            msn = max(pl.segments) if pl.segments else pl.next_msn
            while time.monotonic() < end_at:
                clock.recording = time.monotonic() >= start_at
                if msn in pl.segments:
                    await take(pl, pl.segments[msn], None)
                    msn += 1
                elif pl.ended:
                    break
                else:
                    await asyncio.sleep(poll_s)
                    pl = await load()
                    if pl.segments and msn < pl.media_sequence:
                        msn = pl.media_sequence  # fell out of the window
    return {
        "mode": "blocking" if blocking else "polling",
        "latencies_ms": clock.latencies,
        "unreadable": clock.unreadable,
        "requests": requests,
    }


# -- WHEP reader (child process) -----------------------------------------------------------------


async def read_whep(url: str, seconds: float, warmup: float) -> dict[str, Any]:
    """An aiortc WHEP viewer; the ages of the video frames it decodes."""
    import aiohttp
    from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    clock = FrameClock()
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    tasks: list[asyncio.Task[None]] = []

    async def consume(track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                clock.frame(frame)

    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(consume(t))))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        ) as r:
            answer = await r.text()
            if r.status != 201:
                raise RuntimeError(f"WHEP answered {r.status}: {answer}")
            location = urllib.parse.urljoin(url, r.headers.get("Location", ""))
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.sleep(warmup)
        clock.recording = True
        await asyncio.sleep(seconds)
        clock.recording = False
        if location != url:
            query = urllib.parse.urlsplit(url).query
            async with http.delete(location + (f"?{query}" if query else "")):
                pass
    await pc.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "mode": "whep",
        "latencies_ms": clock.latencies,
        "unreadable": clock.unreadable,
        "state": pc.connectionState,
    }


# -- hls.js in Chromium (child process) ---------------------------------------------------------

# The stamp reader in a page: at each frame a <video> presents (requestVideoFrameCallback), the
# frame is drawn on a canvas and its blocks read as stamp.read does; latency = the frame's
# expected display time on the wall clock - the time painted in it. ``startReading(video)``.
_READER_JS = """
const COLS = 16, GRID_ROWS = 9, ROWS = 4, DARK_MAX = DMAX, BRIGHT_MIN = BMIN;
window.lat = []; window.bad = 0; window.rec = false; window.errors = window.errors || [];
function crc16(bytes) {
  let crc = 0xFFFF;
  for (const b of bytes) {
    crc ^= b << 8;
    for (let i = 0; i < 8; i++) {
      crc = ((crc & 0x8000) ? ((crc << 1) ^ 0x1021) : (crc << 1)) & 0xFFFF;
    }
  }
  return crc;
}
function readStamp(v, c, g) {
  const w = c.width, h = c.height;
  g.drawImage(v, 0, 0, w, h);
  const px = g.getImageData(0, 0, w, Math.ceil(ROWS * h / GRID_ROWS)).data;
  const bits = [];
  for (let i = 0; i < COLS * ROWS; i++) {
    const col = i % COLS, row = Math.floor(i / COLS);
    const x0 = Math.floor(col * w / COLS), x1 = Math.floor((col + 1) * w / COLS);
    const y0 = Math.floor(row * h / GRID_ROWS), y1 = Math.floor((row + 1) * h / GRID_ROWS);
    const qx = Math.floor((x1 - x0) / 4), qy = Math.floor((y1 - y0) / 4);
    let sum = 0, n = 0;
    for (let y = y0 + qy; y < y1 - qy; y++) for (let x = x0 + qx; x < x1 - qx; x++) {
      const o = (y * w + x) * 4;
      sum += 0.299 * px[o] + 0.587 * px[o + 1] + 0.114 * px[o + 2]; n++;
    }
    const mean = sum / n;
    if (mean <= DARK_MAX) bits.push(0); else if (mean >= BRIGHT_MIN) bits.push(1); else return null;
  }
  let ms = 0, crc = 0;
  for (let i = 0; i < 48; i++) ms = ms * 2 + bits[i];
  for (let i = 48; i < 64; i++) crc = crc * 2 + bits[i];
  const bytes = [];
  for (let i = 5, t = ms; i >= 0; i--) { bytes[i] = t % 256; t = Math.floor(t / 256); }
  return crc16(bytes) === crc ? ms : null;
}
function startReading(v) {
  const c = document.createElement("canvas");
  c.width = WIDTH; c.height = HEIGHT;
  const g = c.getContext("2d", {willReadFrequently: true});
  function onFrame(_now, meta) {
    const shown = performance.timeOrigin + meta.expectedDisplayTime;
    const ms = readStamp(v, c, g);
    if (window.rec) { if (ms === null) window.bad++; else window.lat.push(shown - ms); }
    v.requestVideoFrameCallback(onFrame);
  }
  v.requestVideoFrameCallback(onFrame);
}
"""

# hls.js in low-latency mode: parts and blocking reload when the playlist offers them, else a
# plain hls.js live viewer, 3 target durations behind.
_HLS_PLAYER = """<!doctype html>
<html><head><meta charset="utf-8"><title>live latency</title><link rel="icon" href="data:,">
<script src="/hls.min.js"></script></head>
<body><video id="v" muted playsinline></video>
<script>
READER
window.errors = [];
const v = document.getElementById("v");
startReading(v);
const hls = new Hls({enableWorker: false, lowLatencyMode: true});
hls.on(Hls.Events.ERROR, (_e, d) => window.errors.push(`${d.type}:${d.details}:${d.fatal}`));
hls.loadSource(SRC);
hls.attachMedia(v);
hls.on(Hls.Events.MANIFEST_PARSED, () => v.play());
</script></body></html>
"""


def reader_js() -> str:
    """The in-page stamp reader (:data:`_READER_JS`) with the stamp's constants."""
    return (
        _READER_JS.replace("DMAX", str(stamp.DARK_MAX))
        .replace("BMIN", str(stamp.BRIGHT_MIN))
        .replace("WIDTH", str(stamp.WIDTH))
        .replace("HEIGHT", str(stamp.HEIGHT))
    )


def player_page(src: str) -> str:
    """The hls.js page reading the stamps of ``src``."""
    return _HLS_PLAYER.replace("READER", reader_js()).replace("SRC", json.dumps(src))


def whep_player_url(whep: str) -> str:
    """The node's own WHEP player page for a live WHEP endpoint (``/whep/live/player/<in>``)."""
    parts = urllib.parse.urlsplit(whep)
    path = parts.path.replace("/whep/live/", "/whep/live/player/", 1)
    return urllib.parse.urlunsplit(parts._replace(path=path))


async def read_browser(
    url: str, seconds: float, warmup: float, profile: Path, whep: bool
) -> dict[str, Any]:
    """hls.js (or, with ``whep``, the node's WHEP player page) in headless Chromium; the
    display-time ages of the frames the page presents."""
    from tests.support.browser import Browser, player_origin

    async with (
        player_origin(lambda: player_page(url)) as origin,
        Browser.launch(profile) as browser,
    ):
        page = await browser.new_page()
        if whep:
            await page.goto(whep_player_url(url))
            await page.evaluate(reader_js() + "startReading(document.getElementById('video'));")
            video = "document.getElementById('video')"
        else:
            await page.goto(f"{origin}/player.html")
            video = "document.getElementById('v')"
        await page.wait_for(f"{video}.currentTime > 0", timeout_s=30)
        await asyncio.sleep(warmup)
        await page.evaluate("window.rec = true")
        await asyncio.sleep(seconds)
        got = json.loads(
            await page.evaluate(
                "JSON.stringify({lat: window.lat, bad: window.bad, errors: window.errors})"
            )
        )
    return {
        "mode": "chromium whep" if whep else "hls.js",
        "latencies_ms": got["lat"],
        "unreadable": got["bad"],
        "errors": got["errors"][:10],
    }


def serve_dir(directory: Path, port: int) -> int:
    """Serve ``directory`` over HTTP on loopback, with CORS (the anchor's origin)."""
    import functools
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def end_headers(self) -> None:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Handler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        server.serve_forever()
    return 0


# -- orchestration -------------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants, in seconds."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(stat[1]), []).append(int(d.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(f[11]) + int(f[12])) / CLK_TCK
        todo += children.get(p, [])
    return total


def sample_cpu(pids: list[int], seconds: float) -> float:
    """CPU % of one core used by ``pids`` (with their children) over the next ``seconds``."""
    c0, t0 = sum(map(tree_cpu_seconds, pids)), time.monotonic()
    time.sleep(seconds)
    c1, t1 = sum(map(tree_cpu_seconds, pids)), time.monotonic()
    return 100.0 * (c1 - c0) / (t1 - t0)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """This script (or another command) as a child process with this checkout on the path."""
    from tests.support.process import peerd_env

    return subprocess.Popen(args, env=peerd_env(), text=True, **kw)


@contextlib.contextmanager
def running(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """Terminate ``procs`` (SIGTERM, then kill) on the way out."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def start_publisher(rtmp: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    """The publisher child; returns once it has sent its first frame."""
    me = str(Path(__file__).resolve())
    proc = child(
        sys.executable, me, "--publish", rtmp, "--size", args.size,
        "--bitrate", str(args.bitrate), stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "PUBLISHING" not in line:
        proc.wait(10)
        raise RuntimeError(f"publisher to {rtmp} failed (exit {proc.returncode})")
    return proc


def run_reader(kind: str, url: str, seconds: float, warmup: float, out: Path) -> dict[str, Any]:
    """Run a reader child (``hls`` or ``whep``) to completion; its result."""
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, me, f"--read-{kind}", url, "--seconds", str(seconds)]
    proc = child(*cmd, "--warmup", str(warmup), "--out", str(out), stdout=subprocess.PIPE)
    text, _ = proc.communicate(timeout=seconds + warmup + 90)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} reader exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return result


def wait_http(url: str, timeout: float, need: str = "") -> None:
    """Until GET ``url`` answers 200 (with ``need`` in the body, if given)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310
                if r.status == 200 and need.encode() in r.read():
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout}s")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """p50/p95/max of a reader's frame ages, in seconds."""
    lat = sorted(result["latencies_ms"])
    if not lat:
        return {"mode": result.get("mode"), "frames": 0, "unreadable": result["unreadable"]}
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {
        "mode": result.get("mode"),
        "frames": len(lat),
        "unreadable": result["unreadable"],
        "p50_s": round(q[49] / 1000, 3),
        "p95_s": round(q[94] / 1000, 3),
        "max_s": round(lat[-1] / 1000, 3),
        "min_s": round(lat[0] / 1000, 3),
    }


def run_anchor(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ffmpeg -listen RTMP -> plain HLS, 1 s segments, served by http.server, read by polling."""
    d = out / "anchor"
    d.mkdir(parents=True, exist_ok=True)
    rtmp_port, http_port = free_port(), free_port()
    ff = child(
        "ffmpeg", "-hide_banner", "-loglevel", "fatal", "-listen", "1",
        "-i", f"rtmp://127.0.0.1:{rtmp_port}/live/bench", "-c", "copy", "-f", "hls",
        "-hls_time", "1", "-hls_list_size", "6", "-hls_segment_type", "mpegts",
        "-hls_flags", "delete_segments+independent_segments+temp_file",
        "-hls_segment_filename", str(d / "s%05d.ts"), str(d / "index.m3u8"),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    me = str(Path(__file__).resolve())
    web = child(sys.executable, me, "--serve-dir", str(d), "--port", str(http_port))
    with running(ff, web):
        pub = start_publisher(f"rtmp://127.0.0.1:{rtmp_port}/live/bench", args)
        with running(pub):
            url = f"http://127.0.0.1:{http_port}/index.m3u8"
            wait_http(url, 30, need="#EXTINF")
            time.sleep(args.warmup)
            cpu = sample_cpu([ff.pid, web.pid], args.cpu_seconds)
            hls = run_reader("hls", url, args.seconds, args.warmup, out)
            res = {"hls": summary(hls), "input_cpu_pct": round(cpu, 2)}
            if args.browser:
                res["hlsjs"] = summary(run_reader("browser", url, args.seconds, args.warmup, out))
    return res


def start_peerd(out: Path, args: argparse.Namespace) -> tuple[Any, str, str, str]:
    """A daemon from this checkout with one live input; (process, rtmp, hls url, whep url)."""
    from peerd.core import tokens
    from tests.support.process import PeerdProcess
    from tests.support.whep_media import VIEWER_KEY, sign_viewers

    state = out / "node"
    rtmp_port = free_port()
    node = PeerdProcess(
        state,
        config={
            "log": {"level": "info"},
            "live": {"inputs": [{"name": args.input}], "rtmp_listen": f"127.0.0.1:{rtmp_port}"},
            "webrtc": {"max_sessions": args.viewers + 4},
        },
    )
    node.init()
    sign_viewers(state)
    key = secrets.token_urlsafe(18)
    (state / "secrets" / f"live-{args.input}.key").write_text(key)
    node.start()
    expires = int(time.time()) + 3600
    media = f"live:{args.input}"
    hls_token = tokens.mint(VIEWER_KEY, media, "hls", expires)
    whep_token = tokens.mint(VIEWER_KEY, media, "whep", expires)
    base = node.base_url
    return (
        node,
        f"rtmp://127.0.0.1:{rtmp_port}/live/{key}",
        f"{base}/live/{args.input}/index.m3u8?token={hls_token}",
        f"{base}/whep/live/{args.input}?token={whep_token}",
    )


def fan_out_cpu(pid: int, whep: str, viewers: int, seconds: float) -> dict[str, Any]:
    """The daemon's CPU % while ``viewers`` receive-only WHEP viewers watch (whep_bench)."""
    cmd = [sys.executable, str(REPO / "scripts/bench/whep_bench.py"), "--client", whep]
    proc = child(*cmd, "--sessions", str(viewers), "--seconds", str(seconds + 1),
                 stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    with running(proc):
        line = proc.stdout.readline()
        if "CONNECTED" not in line:
            raise RuntimeError(f"WHEP viewers did not connect: {line!r}")
        time.sleep(1.5)
        cpu = sample_cpu([pid], seconds - 0.5)
        got: dict[str, Any] = {}
        for line in proc.stdout:
            if line.startswith("RESULT "):
                got = json.loads(line[7:])
        proc.wait(30)
    fps = got.get("video_frames_per_s", [])
    mbit = got.get("video_mbit_per_s", [])
    return {
        "cpu_pct": cpu,
        "video_fps_min": round(min(fps), 1) if fps else 0.0,
        "video_mbit_per_s": round(statistics.mean(mbit), 2) if mbit else 0.0,
    }


def transcoders(hls_url: str) -> dict[str, float]:
    """The node's ``peerd_live_whep_transcoders_total`` by kind (0 video: passthrough)."""
    import urllib.error
    import urllib.request

    parts = urllib.parse.urlsplit(hls_url)
    found: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"{parts.scheme}://{parts.netloc}/metrics", timeout=5) as r:  # noqa: S310
            for line in r.read().decode().splitlines():
                if line.startswith("peerd_live_whep_transcoders_total{"):
                    kind = line.split('kind="', 1)[1].split('"', 1)[0]
                    found[kind] = float(line.rsplit(" ", 1)[1])
    except (urllib.error.URLError, ConnectionError, IndexError, ValueError):
        pass
    return found


def run_peerd(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Latency and CPU of a peerd node (started here, or the one given with ``--peerd``)."""
    node: Any = None
    if args.peerd:
        rtmp = args.rtmp
        base = args.peerd.rstrip("/")
        hls = f"{base}/live/{args.input}/index.m3u8?token={args.hls_token}"
        whep = f"{base}/whep/live/{args.input}?token={args.whep_token}"
        pid = args.pid
    else:
        node, rtmp, hls, whep = start_peerd(out, args)
        pid = node.proc.pid
    res: dict[str, Any] = {}
    try:
        idle = sample_cpu([pid], args.cpu_seconds) if pid else None
        pub = start_publisher(rtmp, args)
        with running(pub):
            wait_http(hls, 30, need="#EXT-X-PART")
            time.sleep(args.warmup)
            if pid and idle is not None:
                busy = sample_cpu([pid], args.cpu_seconds)
                res["idle_cpu_pct"] = round(idle, 2)
                res["input_cpu_pct"] = round(busy - idle, 2)
            res["llhls"] = summary(run_reader("hls", hls, args.seconds, args.warmup, out))
            if args.browser:
                res["hlsjs"] = summary(run_reader("browser", hls, args.seconds, args.warmup, out))
            res["whep"] = summary(run_reader("whep", whep, args.seconds, args.warmup, out))
            if args.browser:
                got = run_reader("whep-browser", whep, args.seconds, args.warmup, out)
                res["whep_chromium"] = summary(got)
            if pid and idle is not None and args.viewers:
                fan = fan_out_cpu(pid, whep, args.viewers, args.cpu_seconds)
                per = (fan["cpu_pct"] - busy) / args.viewers
                res["fanout"] = {
                    "viewers": args.viewers,
                    "cpu_pct": round(fan["cpu_pct"], 2),
                    "per_viewer_cpu_pct": round(per, 2),
                    "viewers_per_core": round(100 / per, 1) if per > 0 else None,
                    "video_fps_min": fan["video_fps_min"],
                    "video_mbit_per_s": fan["video_mbit_per_s"],
                }
            res["transcoders"] = transcoders(hls)
    finally:
        if node is not None:
            node.stop()
    return res


def _row(name: str, s: dict[str, Any] | None) -> str:
    if not s or not s.get("frames"):
        return f"{name:<34} no frames read"
    return (
        f"{name:<34} p50 {s['p50_s']:6.3f} s  p95 {s['p95_s']:6.3f} s  max {s['max_s']:6.3f} s"
        f"  ({s['frames']} frames, {s['unreadable']} unreadable, {s['mode']})"
    )


def report(result: dict[str, Any]) -> None:
    """Print the table, the ratios and the goals."""
    a, p = result.get("anchor"), result.get("peerd")
    print("\nglass-to-glass latency (wall clock at decode - time painted at the encoder)")
    if p:
        print(_row("peerd LL-HLS", p.get("llhls")))
        if "hlsjs" in p:
            print(_row("peerd LL-HLS, hls.js in Chromium", p.get("hlsjs")))
        print(_row("peerd WHEP (aiortc viewer)", p.get("whep")))
        if "whep_chromium" in p:
            print(_row("peerd WHEP, Chromium player page", p.get("whep_chromium")))
    if a:
        print(_row("anchor ffmpeg HLS 1 s segments", a["hls"]))
        if "hlsjs" in a:
            print(_row("anchor, hls.js in Chromium", a.get("hlsjs")))
    print("\nCPU (% of one core)")
    if p and "input_cpu_pct" in p:
        print(f"peerd idle {p['idle_cpu_pct']}; one passthrough input +{p['input_cpu_pct']}")
    if p and "fanout" in p:
        f = p["fanout"]
        print(
            f"peerd WHEP fan-out: {f['viewers']} viewers {f['cpu_pct']}, per viewer"
            f" {f['per_viewer_cpu_pct']} -> {f['viewers_per_core']} viewers per core"
            f" (each receiving {f['video_mbit_per_s']} Mb/s of video, the slowest"
            f" {f['video_fps_min']} fps)"
        )
    if p and "transcoders" in p:
        print(f"peerd live WHEP transcoders started (0 video = passthrough): {p['transcoders']}")
    if a:
        print(f"anchor ffmpeg ingest + HLS packaging + http.server: {a['input_cpu_pct']}")
    if a and p:
        ll, hl = p.get("llhls") or {}, a["hls"]
        print("\nratios peerd / anchor")
        for k in ("p50_s", "p95_s", "max_s"):
            if ll.get(k) and hl.get(k):
                print(f"LL-HLS {k[:-2]} latency: {ll[k] / hl[k]:.2f}")
        pj, aj = p.get("hlsjs") or {}, a.get("hlsjs") or {}
        for k in ("p50_s", "p95_s"):
            if pj.get(k) and aj.get(k):
                print(f"hls.js {k[:-2]} latency: {pj[k] / aj[k]:.2f}")
        if p.get("input_cpu_pct") is not None and a["input_cpu_pct"] > 0:
            print(f"CPU per input: {p['input_cpu_pct'] / a['input_cpu_pct']:.2f}")
    if p:
        print("\ngoals (issue 22)")
        # What a viewer sees (hls.js) when it was measured, else the low-latency reader's.
        ll_name = "LL-HLS p95 <= 3 s" + (" (hls.js)" if p.get("hlsjs") else "")
        ll = (p.get("hlsjs") or p.get("llhls") or {}).get("p95_s")
        wh_name = "WHEP p95 <= 0.5 s" + (" (Chromium)" if p.get("whep_chromium") else "")
        wh = (p.get("whep_chromium") or p.get("whep") or {}).get("p95_s")
        checks = [
            (ll_name, ll, GOALS["llhls_s"], True),
            (wh_name, wh, GOALS["whep_s"], True),
            ("input <= 10% of a core", p.get("input_cpu_pct"), GOALS["input_core_pct"], True),
            (
                "WHEP >= 16 viewers per core",
                (p.get("fanout") or {}).get("viewers_per_core"),
                GOALS["viewers_per_core"],
                False,
            ),
        ]
        for name, v, goal, below in checks:
            ok = v is not None and (v <= goal if below else v >= goal)
            print(f"  {'met' if ok else 'MISSED':<7}{name}: {v}")


def main() -> int:
    """Command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--anchor-only", action="store_true", help="only the ffmpeg anchor")
    ap.add_argument("--peerd", metavar="URL", help="a running node (else one is started here)")
    ap.add_argument("--rtmp", help="with --peerd: rtmp://HOST:PORT/live/KEY")
    ap.add_argument("--hls-token", default="", help="with --peerd: an hls token for live:INPUT")
    ap.add_argument("--whep-token", default="", help="with --peerd: a whep token for live:INPUT")
    ap.add_argument("--pid", type=int, default=0, help="with --peerd: its pid, for CPU figures")
    ap.add_argument("--input", default="bench", help="the live input's name")
    ap.add_argument("--seconds", type=float, default=20.0, help="latency sampled per path")
    ap.add_argument("--cpu-seconds", type=float, default=10.0, help="each CPU phase")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--viewers", type=int, default=8, help="WHEP viewers for the fan-out CPU")
    ap.add_argument("--size", default=f"{stamp.WIDTH}x{stamp.HEIGHT}", help="published WxH")
    ap.add_argument("--bitrate", type=int, default=stamp.VIDEO_BITRATE, help="video bit/s")
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/live"))
    ap.add_argument(
        "--no-browser",
        dest="browser",
        action="store_false",
        help="skip the hls.js-in-Chromium reader",
    )
    ap.add_argument("--publish", metavar="RTMP", help=argparse.SUPPRESS)
    ap.add_argument("--publish-seconds", type=float, default=3600, help=argparse.SUPPRESS)
    ap.add_argument("--read-hls", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--read-whep", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--poll-s", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--read-browser", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--read-whep-browser", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--serve-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.publish:
        w, _, h = args.size.partition("x")
        return publish(args.publish, args.publish_seconds, int(w), int(h), args.bitrate)
    if args.serve_dir:
        return serve_dir(args.serve_dir, args.port)
    if args.read_hls or args.read_whep or args.read_browser or args.read_whep_browser:
        if args.read_hls:
            coro = read_hls(args.read_hls, args.seconds, args.warmup, args.poll_s)
        elif args.read_browser or args.read_whep_browser:
            profile = args.out / f"chromium-{os.getpid()}"
            url = args.read_browser or args.read_whep_browser
            whep = bool(args.read_whep_browser)
            coro = read_browser(url, args.seconds, args.warmup, profile, whep)
        else:
            coro = read_whep(args.read_whep, args.seconds, args.warmup)
        print(json.dumps(asyncio.run(coro)), flush=True)
        return 0
    if args.peerd and not args.rtmp:
        ap.error("--peerd needs --rtmp (and --hls-token, --whep-token)")

    args.out.mkdir(parents=True, exist_ok=True)
    secret = {"rtmp", "hls_token", "whep_token"}  # keys and tokens stay out of the results
    settings = {k: str(v) for k, v in vars(args).items() if k not in secret}
    result: dict[str, Any] = {"settings": settings}
    if not args.anchor_only:
        result["peerd"] = run_peerd(args.out, args)
    result["anchor"] = run_anchor(args.out, args)
    (args.out / "live_latency.json").write_text(json.dumps(result, indent=2))
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
