"""Live segments to the bucket past the uplink budget, and viewers sent there (issue 22).

The overflow of on-demand HLS (:mod:`peerd.http.hls`, :mod:`peerd.core.uplink`) applied to live
inputs:

* **Push** (:class:`LiveOverflow`, a service): while the uplink is over budget (its send rate
  past ``budget * resume_ratio``, where new streams the bucket can take are redirected, or in
  overflow), every init segment and complete segment of a live publication of this node is
  queued for upload as it is produced (:meth:`peerd.replication.service.Replicator.push_blob`:
  content-addressed ``blobs/<cid>`` like every blob, verified, the catalog row marked
  ``present`` once there). Each blob is queued once. The node checks the window every part
  target, so a segment is queued within a part of its making.
* **Redirect** (:meth:`LiveOverflow.spill`, before a local live segment is served): a viewer's
  stream (input, client, token) not yet admitted is decided by the same admission as on-demand
  streams; one the node does not take whose segment the bucket holds gets a 302 to the bucket
  (presigned or public URL, :class:`peerd.replication.source.BucketLink`). Anything else is
  served by the node as before (a live playlist has no lower rendition to fall back to, and its
  parts exist only in memory: LL-HLS players fetching parts stay on the node).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import Counter

from peerd.core.ids import Cid, parse_cid
from peerd.http.clientip import client_ip
from peerd.http.hls import BlobUrl
from peerd.live.llhls import LiveHls, LiveRoutes, media_id
from peerd.runtime import Runtime

log = logging.getLogger("peerd.live.overflow")

MAX_REMEMBERED = 4096  # blob ids already queued (newest kept)


class LiveOverflow:
    """Pushes live segments to the bucket while the uplink is over budget; redirects viewers."""

    name = "live-overflow"

    def __init__(
        self,
        rt: Runtime,
        hls: LiveHls,
        push: Callable[[Cid], Awaitable[object]],
        bucket_url: BlobUrl | None,
    ) -> None:
        self.rt = rt
        self.hls = hls
        self.push = push
        self.bucket_url = bucket_url
        self.queued: OrderedDict[str, None] = OrderedDict()
        reg = rt.metrics.registry
        self.m_pushed = Counter(
            "peerd_live_r2_pushed",
            "Live segments and init segments queued for the bucket past the uplink budget",
            registry=reg,
        )
        self.m_redirects = Counter(
            "peerd_live_r2_redirects",
            "Live segment requests sent to the bucket (uplink full)",
            registry=reg,
        )

    def over(self) -> bool:
        """Whether the uplink is where new streams go to the bucket."""
        u = self.rt.uplink
        if not u.enabled:
            return False
        return u.overflow or u.rate(time.monotonic()) > u.budget_bps * u.resume_ratio

    async def tick(self) -> int:
        """Queue the window's blobs not queued yet, if over budget; how many were queued."""
        if not self.over():
            return 0
        n = 0
        for stream in list(self.hls.streams.values()):
            tl = stream.timeline
            if tl is None or tl.init is None:
                continue
            for cid in [tl.init, *(s.cid for s in tl.segments)]:
                if cid in self.queued:
                    continue
                row = await self.rt.catalog.get_blob(Cid(cid))
                if row is None:
                    continue  # not stored yet: the next tick
                self.queued[cid] = None
                if len(self.queued) > MAX_REMEMBERED:
                    self.queued.popitem(last=False)
                if row.r2_state != "present":
                    await self.push(Cid(cid))
                    self.m_pushed.inc()
                    n += 1
        if n:
            log.info("live segments queued for the bucket (uplink over budget)", extra={"n": n})
        return n

    async def run(self, ready: Callable[[], None]) -> None:
        """Check the live windows every part target."""
        ready()
        while True:
            await asyncio.sleep(self.rt.settings.live.part_s)
            await self.tick()

    async def spill(self, routes: LiveRoutes, request: web.Request) -> web.Response | None:
        """A 302 to the bucket for a new viewer stream the node does not take, when the bucket
        holds the segment; None: the node serves it."""
        uplink = self.rt.uplink
        if self.bucket_url is None or not uplink.enabled:
            return None
        input, token = await routes._check(request)
        now = time.monotonic()
        stream = (media_id(input), client_ip(request, routes.auth.trusted), token)
        if uplink.admitted(stream, now):
            return None
        cid = parse_cid(request.match_info["cid"])
        row = await self.rt.catalog.get_blob(cid)
        spill = row is not None and row.r2_state == "present" and self.bucket_url.ready()
        if uplink.admit(stream, now, 0.0, spill) or not spill:
            return None
        ext = request.match_info["ext"]
        url = await self.bucket_url(cid, "video/mp4" if ext == "mp4" else "video/iso.segment")
        if url is None:
            return None
        self.m_redirects.inc()
        self.rt.metrics.uplink_overflow.labels(answer="redirect").inc()
        return web.Response(
            status=302, headers=routes._headers() | {"Location": url, "Cache-Control": "no-store"}
        )
