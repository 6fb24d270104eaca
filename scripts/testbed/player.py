"""A player model: what an HLS player does to the network, measured, hundreds per process.

A viewer asks the coordinator where to play (:class:`Route`): a node (a signed master playlist
URL) or the bucket directly (the manifest ``media/<id>.json`` and blobs ``blobs/<cid>``). From a
node it reads the master and media playlists as a player does; from the bucket it reads the
manifest and checks that it hashes to the media id. It then fetches segments in order:

* start: on the lowest rendition; playback starts once ``start_buffer_s`` of media is buffered;
* ABR: the next segment comes from the highest rendition whose BANDWIDTH fits ``abr_safety`` of
  the throughput estimate (an EWMA of the segments' bits / download time);
* buffer: it drains in real time while playing; a download that outlasts the buffer is a stall
  (until that segment arrives); fetching pauses while ``max_buffer_s`` is buffered;
* faults: a refused, failed or wrong answer makes it ask the coordinator again, telling it what
  it met (a node down or sending wrong bytes, or lacking the item: avoided for ``avoid_s``; a
  node answering 503: avoided for its ``Retry-After``; the bucket lacking the item), and
  continue at the same segment on the lowest rendition (its throughput estimate was of the
  source it left); if the coordinator has nothing but a node still refusing, it waits out that
  node's ``Retry-After`` first (nothing but the bucket that just failed: a second). After
  ``give_up_s`` without progress it leaves.

Every body is hashed and compared with the content id in its URL (the segment's cid, or the
media id for a manifest); a mismatch counts its bytes in ``corrupt_bytes`` and is refetched.
Redirects are followed (a node may send a segment to a presigned R2 URL); such bytes count as
``r2_redirect``. Requests to a node wait the home's RTT first (the kernel here has no netem).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin

import aiohttp

from peerd.core.ids import cid_of
from peerd.core.manifest import decode

CID_IN_PATH = re.compile(r"/(b[a-z2-7]{58})(?:\.[a-z0-9]+)?(?:\?|$)")  # node and bucket URLs


@dataclass(frozen=True)
class Route:
    """Where the coordinator sends a viewer: ``kind`` is ``node`` or ``r2``."""

    kind: str
    url: str
    node: int | None = None
    rtt_s: float = 0.0
    urls: dict[str, str] = field(default_factory=dict)


@dataclass
class Rung:
    """One rendition as the player sees it."""

    name: str
    bandwidth: int
    init_url: str | None
    segments: list[tuple[str, float]]  # (url, seconds)


@dataclass
class ViewerStats:
    """What one viewer experienced."""

    viewer: int
    item: int
    arrived: float
    startup_s: float | None = None
    stall_s: float = 0.0
    stalls: int = 0
    played_s: float = 0.0
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    corrupt_bytes: int = 0
    reroutes: int = 0
    gave_up: bool = False
    nodes: list[int] = field(default_factory=list)
    stall_times: list[tuple[float, float]] = field(default_factory=list)  # (when, seconds)
    ended: float = 0.0
    blobs: list[tuple[float, int, str]] = field(default_factory=list)  # (when, node, cid)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when, what failed)


class Failed(Exception):
    """A request the viewer must retry elsewhere: ``why`` is ``down`` (no answer, or wrong
    bytes), ``refused`` (503; ``retry_after_s`` from its header) or ``missing`` (another
    status: the source lacks the item); ``bucket``: the answer came from the bucket a node
    redirected to."""

    def __init__(
        self,
        msg: str,
        why: str = "down",
        retry_after_s: float | None = None,
        bucket: bool = False,
    ) -> None:
        super().__init__(msg)
        self.why = why
        self.retry_after_s = retry_after_s
        self.bucket = bucket


@dataclass
class PlayerConfig:
    """Player knobs."""

    start_buffer_s: float = 2.0
    max_buffer_s: float = 8.0
    abr_safety: float = 0.7
    give_up_s: float = 30.0
    request_timeout_s: float = 10.0
    avoid_s: float = 5.0


R2_FAILED = -1
"""Key of ``Avoid`` for the bucket (the coordinator stops sending this item there)."""

Avoid = dict[int, tuple[float, str]]
"""What a viewer met lately: node (or :data:`R2_FAILED`) -> (until when, ``Failed.why``, or
``redirected``: the node sent it to the bucket, which failed)."""

Router = Callable[[int, Avoid], Awaitable[Route]]
"""``(viewer's item, what it avoids) -> Route``."""


class Player:
    """One viewer's session."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        stats: ViewerStats,
        media_id: str,
        route: Router,
        done: Callable[[Route | None], None],
        cfg: PlayerConfig,
        on_bytes: Callable[[str, int], None],
    ) -> None:
        self.http = http
        self.st = stats
        self.media_id = media_id
        self.route_fn = route
        self.done = done
        self.cfg = cfg
        self.on_bytes = on_bytes
        self.route: Route | None = None
        self.rungs: list[Rung] = []
        self.avoid: Avoid = {}
        self.t0 = time.monotonic()

    async def _get(self, url: str, want: str | None) -> tuple[bytes, str]:
        """GET ``url``; check the body against ``want`` (a cid); returns (body, source)."""
        assert self.route is not None
        if self.route.rtt_s:
            await asyncio.sleep(self.route.rtt_s)
        try:
            async with self.http.get(
                url, timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
            ) as r:
                # A node's redirect that fails is the bucket's failure (an outage), not the
                # node's: the coordinator stops sending this item to the bucket for a while.
                bucket = bool(r.history)
                if r.status == 503:
                    after = r.headers.get("Retry-After", "")
                    wait = float(after) if after.isdigit() else None
                    raise Failed(f"503 from {url[:80]}", "refused", wait, bucket)
                if r.status != 200:
                    raise Failed(f"{r.status} from {url[:80]}", "missing", bucket=bucket)
                body = await r.read()
                redirected = bool(r.history)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Failed(f"{type(exc).__name__} {url[:80]}") from exc
        source = "r2_redirect" if redirected else ("node" if self.route.kind == "node" else "r2")
        if want is not None and str(cid_of(body)) != want:
            self.st.corrupt_bytes += len(body)
            raise Failed(f"wrong bytes for {want}", "down")
        self.st.bytes_by_source[source] = self.st.bytes_by_source.get(source, 0) + len(body)
        if want is not None and self.route.node is not None:
            self.st.blobs.append((time.monotonic(), self.route.node, want))
        self.on_bytes(source, len(body))
        return body, source

    async def _open(self) -> None:
        """Ask the coordinator and read what the player needs to start (playlists/manifest)."""
        if self.route is not None:
            self.done(self.route)
        self.route = None
        now = time.monotonic()
        self.avoid = {k: v for k, v in self.avoid.items() if v[0] > now}
        self.route = await self.route_fn(self.st.item, dict(self.avoid))
        if self.route.node is not None:
            self.st.nodes.append(self.route.node)
        until, why = self.avoid.get(
            R2_FAILED if self.route.node is None else self.route.node, (0, "")
        )
        if until > now and self.route.node is None:
            # Nowhere else to go but the bucket that just failed: not at once again.
            await asyncio.sleep(min(until - now, 1.0))
        elif until > now and why == "refused":
            # Nowhere else to go: back when the node said to.
            await asyncio.sleep(until - now)
        if self.route.kind == "r2":
            body, _ = await self._get(self.route.url, self.media_id)
            m = decode(body)
            urls = self.route.urls
            self.rungs = sorted(
                (
                    Rung(
                        r.id,
                        r.bandwidth,
                        urls[f"blobs/{r.init}"] if r.init else None,
                        [(urls[f"blobs/{s.cid}"], s.duration / r.timescale) for s in r.segments],
                    )
                    for r in m.renditions
                ),
                key=lambda g: g.bandwidth,
            )
            return
        master, _ = await self._get(self.route.url, None)
        variants: list[tuple[int, str]] = []
        bw = 0
        for line in master.decode().splitlines():
            if line.startswith("#EXT-X-STREAM-INF:"):
                bw = int(re.search(r"BANDWIDTH=(\d+)", line).group(1))  # type: ignore[union-attr]
            elif line and not line.startswith("#"):
                variants.append((bw, urljoin(self.route.url, line)))
        rungs = []
        for bw, url in sorted(variants):
            text, _ = await self._get(url, None)
            init = None
            segs: list[tuple[str, float]] = []
            dur = 0.0
            for line in text.decode().splitlines():
                if line.startswith("#EXT-X-MAP:"):
                    init = urljoin(url, line.split('URI="', 1)[1].split('"', 1)[0])
                elif line.startswith("#EXTINF:"):
                    dur = float(line[8:].split(",", 1)[0])
                elif line and not line.startswith("#"):
                    segs.append((urljoin(url, line), dur))
            rungs.append(Rung(url.rsplit("/", 1)[1].split(".")[0], bw, init, segs))
        self.rungs = rungs

    async def _fetch(self, rung: int, seq: int, inits: dict[str, bool]) -> tuple[int, float, bool]:
        """One segment (and its rendition's init segment if not fetched yet), with failover.
        Returns (bytes, seconds of media, whether it came from another source than asked)."""
        last_progress = time.monotonic()
        moved = False
        while True:
            try:
                if not self.rungs:
                    await self._open()
                r = self.rungs[0 if moved else min(rung, len(self.rungs) - 1)]
                total = 0
                if r.init_url and not inits.get(r.name):
                    body, _ = await self._get(r.init_url, _cid(r.init_url))
                    inits[r.name] = True
                    total += len(body)
                url, secs = r.segments[seq]
                body, _ = await self._get(url, _cid(url))
                return total + len(body), secs, moved
            except Failed as exc:
                if time.monotonic() - last_progress > self.cfg.give_up_s:
                    raise
                self._avoid_current(exc)
                self.st.reroutes += 1
                self.rungs = []
                inits.clear()
                moved = True
                await asyncio.sleep(0.2)

    async def run(self) -> None:
        """Play the item to its end (or give up)."""
        t0 = time.monotonic()
        buffer = 0.0
        playing = False
        estimate = 0.0
        rung = 0
        inits: dict[str, bool] = {}
        try:
            await self._open_first()
            n = len(self.rungs[0].segments)
            for seq in range(n):
                if playing and buffer > self.cfg.max_buffer_s:
                    await asyncio.sleep(buffer - self.cfg.max_buffer_s)
                    buffer = self.cfg.max_buffer_s
                t = time.monotonic()
                size, secs, moved = await self._fetch(rung, seq, inits)
                dt = max(time.monotonic() - t, 1e-3)
                if moved:
                    rung, estimate = 0, 0.0  # a new source: measured anew, from the bottom
                if playing:
                    if dt > buffer:
                        self.st.stall_s += dt - buffer
                        self.st.stalls += 1
                        self.st.stall_times.append(
                            (time.monotonic() - t0 + self.st.arrived, dt - buffer)
                        )
                        self.st.played_s += buffer
                        buffer = 0.0
                    else:
                        buffer -= dt
                        self.st.played_s += dt
                buffer += secs
                bps = size * 8 / dt
                if not moved:  # the time spent failing over is not the new source's throughput
                    estimate = bps if estimate == 0 else 0.5 * estimate + 0.5 * bps
                rung = max(
                    (
                        i
                        for i, r in enumerate(self.rungs)
                        if r.bandwidth <= estimate * self.cfg.abr_safety
                    ),
                    default=0,
                )
                if not playing and buffer >= self.cfg.start_buffer_s:
                    playing = True
                    self.st.startup_s = time.monotonic() - t0
            if not playing:
                self.st.startup_s = time.monotonic() - t0
            # The rest of the buffer plays out; the session holds its node until then.
            await asyncio.sleep(buffer)
            self.st.played_s += buffer
        except Failed:
            self.st.gave_up = True
        finally:
            self.st.ended = time.monotonic() - t0 + self.st.arrived
            self.done(self.route)

    def _avoid_current(self, exc: Failed) -> None:
        if self.route is not None:
            # For a while only: a restarted node, or the bucket after an outage, serves again;
            # a node that refused says when to come back.
            key = R2_FAILED if exc.bucket or self.route.node is None else self.route.node
            wait = self.cfg.avoid_s
            if exc.why == "refused" and exc.retry_after_s is not None:
                wait = exc.retry_after_s
            now = time.monotonic()
            where = "bucket " if exc.bucket else ""
            self.st.failures.append((round(now - self.t0, 2), f"{where}{exc}"[:120]))
            self.avoid[key] = (now + wait, exc.why)
            if exc.bucket and self.route.node is not None:
                # It would redirect this viewer there again.
                self.avoid[self.route.node] = (now + wait, "redirected")

    async def _open_first(self) -> None:
        last = time.monotonic()
        while True:
            try:
                await self._open()
                return
            except Failed as exc:
                if time.monotonic() - last > self.cfg.give_up_s:
                    raise
                self._avoid_current(exc)
                self.st.reroutes += 1
                await asyncio.sleep(0.2)


def _cid(url: str) -> str:
    m = CID_IN_PATH.search(url)
    if m is None:
        raise Failed(f"no content id in {url[:80]}")
    return m.group(1)
