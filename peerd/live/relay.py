"""Relaying another node's live input to this node's viewers (issue 22, Network).

A node asked for ``/live/<input>/...`` of an input it does not publish (not in its own
``[live] inputs``) finds a LAN peer that has the input live and serves the stream itself:

* **Origin side** (:func:`install_origin`, on every node with live on): two node-to-node
  routes, signed with the node key like ``/p2p/v1/blobs`` (:mod:`peerd.p2p.lan`), readable by
  LAN peers from mDNS and ``[mdns] trusted_peers``::

      GET /p2p/v1/live/<input>[?msn=M&part=P]     the timeline's state (peerd.core.liverelay),
                                                  held like a blocking playlist reload
      GET /p2p/v1/live/<input>/part/<pub>/<n>     part n (the hinted next part waits)

  The state is answered only once the blob writes of the publication are done, so every
  content id it lists is already served by ``/p2p/v1/blobs``.
* **Relay side** (:class:`LiveRelay`): one :class:`Upstream` per relayed input, made by the
  first viewer request and gone :data:`IDLE_S` after the last. Its one task follows the origin
  with blocking requests for the next part (one upstream request per input, shared by every
  viewer), rebuilds the :class:`~peerd.core.llhls.Timeline` and wakes the waiting viewers.
  Viewers' playlists are rendered here with this node's URIs and tokens (``live:<input>`` on
  this node's key). Segments and the init segment come by content id through this node's
  resolver (LAN, libp2p, R2: verified against their id and stored once, single flight), so the
  origin sends each to this node once; they leave the store one window after they leave the
  playlist. Parts are fetched from the origin once per part (shared futures) and kept in memory
  while their segment is in the window.

The origin is found by asking the LAN peers the directory knows (fastest first): a node lists
no inputs it could relay, it just answers the state route for the inputs it has live. This
works on a LAN with nothing configured (mDNS carries each peer's URL); libp2p-only peers serve
segments through the resolver but not the playlist (they have no HTTP URL). When the origin
ends, the relay's playlist ends (``EXT-X-ENDLIST``); when it vanishes (no answer for
:data:`LOST_S`), viewers get 503 + ``Retry-After`` while the relay looks for it again, never 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from peerd.catalog.media import is_referenced
from peerd.core import liverelay, llhls
from peerd.core.ids import Cid, parse_cid
from peerd.core.llhls import Timeline
from peerd.core.playlist import MIME_PLAYLIST
from peerd.core.signing import check, sign_headers
from peerd.delivery.resolver import Resolver
from peerd.discovery.directory import PeerDirectory
from peerd.errors import BadRequest, Forbidden, NotFound, Unauthorized, Unavailable
from peerd.http.clientip import client_ip
from peerd.identity import peer_id_of, verify_signature
from peerd.live.llhls import (
    _CT_SEGMENT,
    BLOCK_S,
    ENDED_KEEP_S,
    RETRY_AFTER_S,
    Changes,
    LiveHls,
    LiveRoutes,
    Stream,
)
from peerd.runtime import Runtime

log = logging.getLogger("peerd.live.relay")

STATE_ROUTE = "/p2p/v1/live/{input}"
PART_ROUTE = "/p2p/v1/live/{input}/part/{pub}/{n}"
IDLE_S = 30.0  # an upstream nobody asked for this long stops
LOST_S = 4.0  # an origin that has not answered this long is gone: viewers get 503
MAX_INPUTS = 32  # relayed inputs at once
MAX_PART = 8 * 1024 * 1024  # largest part accepted from an origin
MAX_STATE = 1024 * 1024


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 12:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(raw)


# -- origin side ------------------------------------------------------------------------------


def install_origin(
    app: web.Application, rt: Runtime, hls: LiveHls, directory: PeerDirectory
) -> None:
    """Add the signed routes LAN peers relay this node's live inputs through."""
    if not rt.settings.live.enabled:
        return
    trusted = set(rt.settings.mdns.trusted_peers)
    skew = rt.settings.mdns.signature_skew_s

    def authenticate(request: web.Request) -> None:
        verdict = check(
            request.method,
            request.path,
            request.headers,
            time.time(),
            skew_s=skew,
            peer_id_of=peer_id_of,
            verify=verify_signature,
            known=lambda p: p in trusted or directory.known(p),
        )
        if verdict.peer_id is None:
            if verdict.reason == "unknown peer":
                raise Forbidden(f"peer not allowed here: {verdict.reason}")
            raise Unauthorized(f"node signature required: {verdict.reason}")

    def local(input: str) -> Stream:
        if input not in hls.inputs:
            raise NotFound(f"no live input {input!r} here")  # never relayed onwards: no loops
        return hls.stream(input)

    async def state(request: web.Request) -> web.Response:
        authenticate(request)
        stream = local(request.match_info["input"])
        msn, part = _query_int(request, "msn"), _query_int(request, "part")
        deadline = asyncio.get_running_loop().time() + BLOCK_S
        while True:
            tl = stream.timeline
            assert tl is not None
            if tl.init is not None and tl.ready(msn, part) is not llhls.Ready.WAIT:
                break
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await stream.changed(left):
                break  # the state as it is: the relay asks again
        # Every blob the state lists is in the store (LAN peers fetch them by id).
        await stream.flushed()
        return web.json_response(
            liverelay.encode(tl, stream.id), headers={"Cache-Control": "no-store"}
        )

    async def part(request: web.Request) -> web.Response:
        authenticate(request)
        stream = local(request.match_info["input"])
        if request.match_info["pub"] != stream.id:
            raise NotFound("no such part in this publication")
        number = int(request.match_info["n"])
        deadline = asyncio.get_running_loop().time() + BLOCK_S
        while (data := stream.parts.get(number)) is None:
            tl = stream.timeline
            assert tl is not None
            if tl.ended or number < tl.next_part or number > tl.next_part + 1:
                raise NotFound("no such part")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await stream.changed(left):
                raise Unavailable("the part is not available yet", retry_after=1)
        return web.Response(
            body=data,
            headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"},
        )

    name = r"{input:[a-z0-9][a-z0-9_-]{0,31}}"
    app.router.add_get(f"/p2p/v1/live/{name}", state)
    app.router.add_get(f"/p2p/v1/live/{name}/part/{{pub:[0-9a-f]{{8}}}}/{{n:[0-9]{{1,9}}}}", part)


# -- relay side -------------------------------------------------------------------------------


class RelayMetrics:
    """What operators count on a relay: upstream requests by outcome, parts fetched."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.upstream = Counter(
            "peerd_live_relay_upstream_requests",
            "Requests of a relaying node to origins for live state: ok, failed, none (no origin)",
            ["result"],
            registry=reg,
        )
        self.parts = Counter(
            "peerd_live_relay_parts_fetched", "Parts fetched from origins", registry=reg
        )


class Upstream:
    """One relayed input: the origin, its timeline as last seen, the parts fetched."""

    def __init__(self, relay: LiveRelay, input: str) -> None:
        self.relay = relay
        self.input = input
        self.origin: str | None = None
        self.timeline: Timeline | None = None
        self.pub = ""
        self.wanted = time.monotonic()
        self.parts: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        self.fetched: set[Cid] = set()  # blobs stored for this input's viewers
        self.retired: list[tuple[float, Cid]] = []
        self._changes = Changes()
        self.task: asyncio.Task[None] | None = None

    # what viewers wait on

    def notify(self) -> None:
        """Wake every viewer waiting for a change."""
        self._changes.notify()

    async def changed(self, within_s: float) -> bool:
        """Wait for a new state (False after ``within_s``)."""
        return await self._changes.wait(within_s)

    # the one task following the origin

    async def run(self) -> None:
        """Follow the origin while viewers ask; then forget the input."""
        lost_since: float | None = None
        ended_at: float | None = None
        try:
            while time.monotonic() - self.wanted < IDLE_S:
                ok = await self._step()
                now = time.monotonic()
                if ok:
                    lost_since = None
                    if self.timeline is not None and self.timeline.ended:
                        # Asked again now and then: the input may come back (a new publication).
                        ended_at = ended_at or now
                        if now - ended_at > ENDED_KEEP_S:
                            break
                        await asyncio.sleep(1.0)
                    else:
                        ended_at = None
                    continue
                lost_since = lost_since or now
                if now - lost_since > LOST_S and self.timeline is not None:
                    log.info("live origin lost", extra={"input": self.input, "url": self.origin})
                    self.timeline = None
                    self.notify()
                await asyncio.sleep(0.5)
        finally:
            self.timeline = None
            self.notify()
            if self.relay.upstreams.get(self.input) is self:
                del self.relay.upstreams[self.input]
            self.retired += [(0.0, c) for c in self.fetched]
            await self.relay.delete_due(self)

    async def _step(self) -> bool:
        """One upstream request; whether it brought a state."""
        m = self.relay.metrics.upstream
        if self.origin is None:
            self.origin = await self.relay.find_origin(self.input)
            if self.origin is None:
                m.labels(result="none").inc()
                return False
        want = liverelay.wanted(self.timeline)
        query = {} if want is None else {"msn": str(want[0]), "part": str(want[1])}
        try:
            body = await self.relay.get(self.origin, STATE_ROUTE.format(input=self.input), query)
            tl, pub = liverelay.decode(body)
        except (Unavailable, ValueError) as exc:
            m.labels(result="failed").inc()
            log.info(
                "live origin did not answer",
                extra={"input": self.input, "url": self.origin, "error": str(exc)},
            )
            self.origin = None  # look again: it may have moved, or another node has it now
            return False
        m.labels(result="ok").inc()
        self._update(tl, pub)
        return True

    def _update(self, tl: Timeline, pub: str) -> None:
        if pub != self.pub:
            self.parts.clear()
        self.timeline, self.pub = tl, pub
        kept = liverelay.cids(tl)
        if tl.segments:
            oldest = tl.segments[0].parts[0].number
            for key in [k for k in self.parts if k[1] < oldest]:
                del self.parts[key]
        due = time.monotonic() + tl.window * float(tl.segment_target)
        for cid in [c for c in self.fetched if c not in kept]:
            self.fetched.discard(cid)
            self.retired.append((due, cid))
        if self.retired and min(t for t, _ in self.retired) <= time.monotonic():
            self.relay.spawn(self.relay.delete_due(self))
        self.notify()

    async def part(self, pub: str, number: int) -> bytes:
        """Part ``number`` of publication ``pub``, fetched from the origin once for every
        viewer."""
        key = (pub, number)
        fut = self.parts.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch_part(pub, number))
            self.parts[key] = fut
            fut.add_done_callback(lambda f: self._failed(key, f))
        return await asyncio.shield(fut)

    def _failed(self, key: tuple[str, int], fut: asyncio.Future[bytes]) -> None:
        if (fut.cancelled() or fut.exception() is not None) and self.parts.get(key) is fut:
            del self.parts[key]  # the next viewer asks again

    async def _fetch_part(self, pub: str, number: int) -> bytes:
        if self.origin is None:
            raise Unavailable("the live origin is not reachable now", retry_after=RETRY_AFTER_S)
        path = PART_ROUTE.format(input=self.input, pub=pub, n=number)
        data = await self.relay.get_bytes(self.origin, path)
        self.relay.metrics.parts.inc()
        return data


class LiveRelay:
    """This node's relays of other nodes' live inputs (the routes' other half)."""

    def __init__(self, rt: Runtime, hls: LiveHls, resolver: Resolver, directory: PeerDirectory):
        self.rt = rt
        self.hls = hls
        self.resolver = resolver
        self.directory = directory
        self.upstreams: dict[str, Upstream] = {}
        self.metrics = RelayMetrics(rt)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def relays(self, input: str) -> bool:
        """Whether ``input`` is another node's (not one of this node's inputs)."""
        return input not in self.hls.inputs

    def upstream(self, input: str) -> Upstream:
        """The relay of ``input`` (started by the first viewer)."""
        up = self.upstreams.get(input)
        if up is None:
            if len(self.upstreams) >= MAX_INPUTS:
                raise Unavailable("this node relays as many live inputs as it can")
            up = self.upstreams[input] = Upstream(self, input)
            up.task = asyncio.get_running_loop().create_task(up.run())
        up.wanted = time.monotonic()
        return up

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background (kept until done)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def client(self) -> aiohttp.ClientSession:
        """The HTTP client to origins (opened on first use)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=BLOCK_S + 4),
            )
        return self._session

    async def _get(
        self, base: str, path: str, query: dict[str, str], read: Callable[[Any], Any]
    ) -> Any:
        ident = self.rt.identity
        headers = sign_headers(
            "GET", path, time.time(), ident.peer_id, ident.public_bytes, ident.sign
        )
        try:
            async with self.client().get(
                base.rstrip("/") + path, params=query, headers=headers
            ) as resp:
                if resp.status == 404:
                    raise NotFound(f"{base} has no such live part or input")
                if resp.status != 200:
                    raise Unavailable(f"{base} answered HTTP {resp.status}", retry_after=1)
                return await read(resp)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Unavailable(f"{base} unreachable: {exc!r}", retry_after=1) from exc

    async def get(self, base: str, path: str, query: dict[str, str]) -> Any:
        """A signed GET of a JSON state; NotFound on 404, Unavailable on anything else."""

        async def read(resp: aiohttp.ClientResponse) -> Any:
            raw = await resp.content.read(MAX_STATE + 1)
            if len(raw) > MAX_STATE:
                raise Unavailable("live state too large")
            return json.loads(raw)

        try:
            return await self._get(base, path, query, read)
        except NotFound as exc:
            raise Unavailable(exc.message) from exc

    async def get_bytes(self, base: str, path: str) -> bytes:
        """A signed GET of a part."""

        async def read(resp: aiohttp.ClientResponse) -> bytes:
            data = await resp.content.read(MAX_PART + 1)
            if len(data) > MAX_PART:
                raise Unavailable("live part too large")
            return data

        data: bytes = await self._get(base, path, {}, read)
        return data

    async def find_origin(self, input: str) -> str | None:
        """The URL of the first LAN peer (fastest first) that has ``input`` live."""
        me = self.rt.identity.peer_id
        for peer in self.directory.order():
            if not peer.url or peer.peer_id == me:
                continue
            try:
                await self.get(peer.url, STATE_ROUTE.format(input=input), {})
            except (Unavailable, ValueError):
                continue
            log.info("live origin found", extra={"input": input, "url": peer.url})
            return peer.url
        return None

    async def delete_due(self, up: Upstream) -> None:
        """Delete relayed blobs that left the window a window ago (unless a media item, a pin,
        a local publication or another relayed window uses them)."""
        now = time.monotonic()
        due = [c for t, c in up.retired if t <= now]
        up.retired = [(t, c) for t, c in up.retired if t > now]
        store = self.rt.store
        for cid in due:
            used = any(cid in u.fetched for u in self.upstreams.values()) or any(
                cid in s.segments or (s.init and s.init[0] == cid)
                for s in self.hls.streams.values()
            )
            row = await store.catalog.get_blob(cid)
            if used or row is None or row.pinned or await is_referenced(store.catalog, cid):
                continue
            await store.delete(cid)

    async def close(self) -> None:
        """Stop every upstream and close the client."""
        for up in list(self.upstreams.values()):
            if up.task is not None:
                up.task.cancel()
        tasks = [u.task for u in self.upstreams.values() if u.task is not None]
        await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- the viewer routes of a relayed input (called by peerd.live.llhls.LiveRoutes) -------

    async def playlist(self, routes: LiveRoutes, request: web.Request) -> web.Response:
        """The relayed playlist, rendered here; blocking reloads wait on the shared upstream."""
        input, token = await routes._check(request)
        msn = _query_int(request, "_HLS_msn")
        part = _query_int(request, "_HLS_part")
        skip = request.query.get("_HLS_skip", "").upper() in ("YES", "V2")
        up = self.upstream(input)
        self.hls.saw(input, f"{token or ''} {client_ip(request, routes.auth.trusted)}")
        deadline = asyncio.get_running_loop().time() + BLOCK_S
        while True:
            tl = up.timeline
            if tl is not None and tl.init is not None and (tl.segments or tl.ended):
                state = tl.ready(msn, part)
                if state is llhls.Ready.BAD:
                    raise BadRequest("_HLS_msn/_HLS_part out of range")
                if state is llhls.Ready.NOW:
                    break
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await up.changed(left):
                raise Unavailable(
                    f"live input {input!r} is not reachable now", retry_after=RETRY_AFTER_S
                )
        q = f"?token={token}" if token else ""
        pub = up.pub
        uris = llhls.Uris(
            init=lambda cid: f"b/{cid}.mp4{q}",
            segment=lambda cid: f"b/{cid}.m4s{q}",
            part=lambda n: f"part/{pub}/{n}.m4s{q}",
        )
        body = tl.render(uris, skip=skip).encode()
        return web.Response(body=body, headers=routes._headers(MIME_PLAYLIST, "no-store"))

    async def part(self, routes: LiveRoutes, request: web.Request) -> web.Response:
        """A part, from the origin once for all of this node's viewers."""
        input, _ = await routes._check(request)
        up = self.upstream(input)
        data = await up.part(request.match_info["pub"], int(request.match_info["n"]))
        routes._sent(len(data))
        return web.Response(body=data, headers=routes._headers(_CT_SEGMENT, routes.blob_cache))

    async def blob(self, routes: LiveRoutes, request: web.Request) -> web.StreamResponse:
        """A segment or the init segment of the window, through this node's resolver."""
        input, _ = await routes._check(request)
        up = self.upstream(input)
        cid = parse_cid(request.match_info["cid"])
        tl = up.timeline
        if tl is None:
            raise Unavailable(f"live input {input!r} is not reachable now", retry_after=1)
        if cid not in liverelay.cids(tl):
            raise NotFound("no such segment in this publication's window")
        path = await self.resolver.ensure_local(cid)
        up.fetched.add(cid)
        ext = request.match_info["ext"]
        headers = routes._headers("video/mp4" if ext == "mp4" else _CT_SEGMENT, routes.blob_cache)
        headers["ETag"] = f'"{cid}"'
        routes._sent(path.stat().st_size)
        return web.FileResponse(path, headers=headers)
