"""LAN transfers between nodes over HTTP, signed with the node key.

Routes (installed on the node's HTTP app):

- ``GET /p2p/v1/blobs/<cid>`` serves a blob this node holds, with sendfile, to a peer that signed
  the request (``peerd.core.signing``); unsigned, stale, forged or unknown-peer requests get
  401/403. It never fetches on a peer's behalf (no loops between nodes): not held is 404.
  These bytes stay on the home's network: the uplink budget (:mod:`peerd.core.uplink`) does
  not count them.
  For a media id in this node's catalog it serves the manifest (a media id is the manifest's
  CID), so :class:`LanSource` finds manifests for :mod:`peerd.delivery.media` as it finds blobs.
- ``GET /p2p/v1/media/<media id>`` serves the manifest of a media item in this node's catalog
  (same signature rules); the media id is the manifest's CID, so the asker verifies the bytes.
  Used by :meth:`LanSource.pull_media_from` for the coordinator's prefetch from a named peer.
- ``GET /p2p/v1/held/<media id>`` answers ``{"media_id", "complete"}``: whether this node holds
  every blob of the media item (a full copy), for a peer's tiering deciding whether the bucket's
  copy may go (:meth:`LanSource.full_copies`; same signature rules).
- ``POST /p2p/v1/fetch/<cid>`` makes the node get a blob through its resolver (local, LAN,
  libp2p, R2, transcode) and answers ``{"cid", "size"}``; only the node's own key or a
  ``mdns.trusted_peers`` key may sign it (operator tooling and tests, a prefetch by hand).

:class:`LanSource` is the delivery :class:`~peerd.delivery.Source` that asks LAN peers from the
peer directory, fastest measured round trip first, for a blob; its reports feed the directory's
bans, so a peer that sent wrong bytes drops out of the order.

:meth:`LanSource.pull_media_from` runs :func:`peerd.delivery.pull.pull_media` against one named
peer (``POST /api/v1/commands/prefetch`` with ``source: "peer"``): the manifest, then each missing
blob from that peer only, every byte verified against its id, the rows committed after the last
blob. A peer that sends bytes not matching their id is banned and the pull fails with
:class:`~peerd.errors.IntegrityError`; nothing partial is kept. Only live LAN peers (mDNS) with an
HTTP URL can be named: a libp2p-only peer's media (manifest and blobs) arrives through
``source: "any"`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from peerd.catalog.media import holds_media, media_manifest
from peerd.core.ids import Cid, parse_cid
from peerd.core.peers import BanPolicy, Peer
from peerd.core.signing import check, sign_headers
from peerd.delivery.pull import PullReport, pull_media
from peerd.delivery.resolver import Resolver
from peerd.delivery.source import Offer
from peerd.discovery.directory import PeerDirectory
from peerd.errors import Forbidden, IntegrityError, NotFound, Unauthorized, UpstreamError
from peerd.identity import Identity, peer_id_of, verify_signature
from peerd.runtime import Runtime

log = logging.getLogger("peerd.p2p.lan")

ROUTE = "/p2p/v1/blobs/{cid}"
MEDIA_ROUTE = "/p2p/v1/media/{media_id}"
HELD_ROUTE = "/p2p/v1/held/{media_id}"
FETCH_ROUTE = "/p2p/v1/fetch/{cid}"
CHUNK = 256 * 1024
MAX_MANIFEST = 16 * 1024 * 1024


def lan_directory(rt: Runtime) -> PeerDirectory:
    """A LAN peer directory as ``[mdns]`` configures it (the daemon builds one, shared by mDNS,
    the routes and the LAN source)."""
    cfg = rt.settings.mdns
    return PeerDirectory(
        rt.catalog,
        via="mdns",
        # No timer of its own: a peer leaves when mDNS says so (discovery/mdns).
        ttl_s=math.inf,
        policy=BanPolicy(cfg.max_failures, cfg.ban_failure_s, cfg.ban_integrity_s),
    )


def install(
    app: web.Application, rt: Runtime, directory: PeerDirectory, resolver: Resolver | None = None
) -> None:
    """Add the node-to-node routes: peers known to ``directory`` may read; ``POST`` fetches go
    through ``resolver`` (none: 404)."""
    trusted = set(rt.settings.mdns.trusted_peers)
    operators = trusted | {rt.identity.peer_id}
    skew = rt.settings.mdns.signature_skew_s
    served = rt.metrics.bytes_served.labels(source="lan-peer")

    def authenticate(request: web.Request, known: Callable[[str], bool]) -> str:
        verdict = check(
            request.method,
            request.path,
            request.headers,
            time.time(),
            skew_s=skew,
            peer_id_of=peer_id_of,
            verify=verify_signature,
            known=known,
        )
        if verdict.peer_id is None:
            log.info(
                "refused node request",
                extra={"reason": verdict.reason, "remote": request.remote, "path": request.path},
            )
            if verdict.reason == "unknown peer":
                raise Forbidden(f"peer not allowed here: {verdict.reason}")
            raise Unauthorized(f"node signature required: {verdict.reason}")
        return verdict.peer_id

    async def get_blob(request: web.Request) -> web.StreamResponse:
        authenticate(request, lambda p: p in trusted or directory.known(p))
        cid = parse_cid(request.match_info["cid"])
        try:
            path = await rt.store.open_path(cid)
        except NotFound:
            # A media id is the CID of its manifest: the manifest is served as that blob.
            body = await media_manifest(rt.catalog, cid)
            if body is None:
                raise
            return web.Response(
                body=body,
                headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"},
            )
        size = path.stat().st_size
        rt.access.record(cid, size, time.time())
        # Not counted into the uplink meter: a LAN peer is on the home's own network, so these
        # bytes never cross the uplink the budget protects (counted, the node turned its own
        # viewers away while its partner filled the LAN link).
        served.inc(size)
        return web.FileResponse(
            path,
            headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"},
        )

    async def get_manifest(request: web.Request) -> web.Response:
        authenticate(request, lambda p: p in trusted or directory.known(p))
        media_id = parse_cid(request.match_info["media_id"])
        body = await media_manifest(rt.catalog, media_id)
        if body is None:
            raise NotFound(f"media {media_id} is not in this node's catalog")
        return web.Response(
            body=body,
            headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
        )

    async def held(request: web.Request) -> web.Response:
        authenticate(request, lambda p: p in trusted or directory.known(p))
        media_id = parse_cid(request.match_info["media_id"])
        complete = await holds_media(rt.catalog, media_id)
        return web.json_response(
            {"media_id": media_id, "complete": complete}, headers={"Cache-Control": "no-store"}
        )

    async def fetch(request: web.Request) -> web.Response:
        authenticate(request, operators.__contains__)
        cid = parse_cid(request.match_info["cid"])
        if resolver is None:
            raise NotFound("this node has no resolver")
        path = await resolver.ensure_local(cid)
        return web.json_response({"cid": cid, "size": path.stat().st_size})

    app.router.add_get(ROUTE, get_blob)
    app.router.add_get(MEDIA_ROUTE, get_manifest)
    app.router.add_get(HELD_ROUTE, held)
    app.router.add_post(FETCH_ROUTE, fetch)


class LanSource:
    """Blobs from LAN peers over signed HTTP, fastest peer first; whole media from a named one."""

    name = "lan"

    def __init__(
        self, rt: Runtime, directory: PeerDirectory, *, timeout_s: float = 10.0, max_peers: int = 4
    ) -> None:
        self.rt = rt
        self.directory = directory
        self.identity = rt.identity
        self.timeout_s = timeout_s
        self.max_peers = max_peers
        self._session: aiohttp.ClientSession | None = None

    def client(self) -> aiohttp.ClientSession:
        """The HTTP client to LAN peers (opened on first use)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=self.timeout_s),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()

    def _peers(self) -> list[Peer]:
        return [p for p in self.directory.order() if p.url and p.peer_id != self.identity.peer_id]

    def idle(self) -> bool:
        """No LAN peer known: :meth:`offers` would ask nobody."""
        return not self._peers()

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """One offer per LAN peer that answers 200, fastest first.

        A peer that answers 5xx or 429 failed for now rather than said it lacks the blob: if no
        offer came, :class:`UpstreamError` tells the resolver to retry instead of answering 404.
        """
        peers = self._peers()
        failed = 0
        for peer in peers[: self.max_peers]:
            assert peer.url is not None
            started = time.monotonic()
            try:
                resp = await signed_get(
                    self.client(), self.identity, peer.url, ROUTE.format(cid=cid)
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.directory.report(peer.peer_id, False, type(exc).__name__)
                continue
            self.directory.rtt(peer.peer_id, (time.monotonic() - started) * 1000)
            if resp.status != 200:
                resp.release()
                if resp.status != 404:
                    # Refusals (401/403/5xx) count against the peer; "not held" does not.
                    self.directory.report(peer.peer_id, False, f"http {resp.status}")
                failed += resp.status >= 500 or resp.status == 429
                continue
            yield Offer(
                self.name,
                peer.peer_id,
                stream_body(resp),
                size=resp.content_length,
                meta={"url": peer.url},
            )
        if failed:
            raise UpstreamError(f"{failed} LAN peer(s) failed to answer for {cid}")

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """Feed the outcome into the peer directory (bans on integrity failures)."""
        self.directory.report(offer.peer, ok, reason)

    async def full_copies(self, media_id: str) -> tuple[set[str], bool]:
        """The LAN peers that hold every blob of ``media_id`` (``GET /p2p/v1/held/<id>``,
        all known peers asked at once), and whether every one of them answered."""

        async def ask(peer: Peer) -> bool | None:
            assert peer.url is not None
            try:
                resp = await signed_get(
                    self.client(), self.identity, peer.url, HELD_ROUTE.format(media_id=media_id)
                )
                async with resp:
                    if resp.status == 404:
                        return False  # a node without the route holds nothing it can vouch for
                    if resp.status != 200:
                        return None
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.info("copy lookup failed", extra={"peer": peer.peer_id, "error": repr(exc)})
                return None
            return isinstance(body, dict) and body.get("complete") is True

        peers = self._peers()
        answers = await asyncio.gather(*(ask(p) for p in peers))
        holders = {p.peer_id for p, a in zip(peers, answers, strict=True) if a}
        return holders, all(a is not None for a in answers)

    async def pull_media_from(self, peer_id: str, media_id: str) -> PullReport:
        """Fetch ``media_id`` (manifest and every blob) from ``peer_id`` into the local store."""
        peer = self.directory.table.get(peer_id)
        if peer is None or not peer.url or not self.directory.known(peer_id):
            raise NotFound(
                f"peer {peer_id} is not a live LAN peer of this node (only peers seen by mDNS, "
                "not banned, can be named)"
            )
        named = _NamedPeer(peer_id, peer.url, self)
        try:
            report = await pull_media(
                self.rt.catalog, self.rt.store, media_id, lambda: named.manifest(media_id), named
            )
        except IntegrityError:
            self.directory.report(peer_id, False, "integrity")
            raise
        self.directory.report(peer_id, True)
        log.info(
            "media pulled from peer",
            extra={"media": media_id, "peer": peer_id, "fetched": report.fetched},
        )
        return report


@dataclass
class _NamedPeer:
    """One LAN peer as a :class:`~peerd.delivery.source.Source` (refusals are errors)."""

    peer_id: str
    base: str
    lan: LanSource
    name: str = "lan"
    timeout_s: float = 30.0

    async def get(self, path: str) -> aiohttp.ClientResponse:
        """A signed GET of ``path`` on the peer."""
        try:
            return await signed_get(self.lan.client(), self.lan.identity, self.base, path)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"LAN peer at {self.base} unreachable: {exc!r}") from exc

    async def manifest(self, media_id: str) -> bytes:
        """The peer's manifest bytes of ``media_id`` (checked by the pull)."""
        resp = await self.get(MEDIA_ROUTE.format(media_id=media_id))
        try:
            if resp.status == 404:
                raise NotFound(f"peer {self.peer_id} does not have media {media_id}")
            if resp.status != 200:
                raise UpstreamError(f"peer {self.peer_id} refused the manifest: HTTP {resp.status}")
            return await resp.content.read(MAX_MANIFEST + 1)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"manifest transfer from {self.peer_id} broke: {exc!r}") from exc
        finally:
            resp.release()

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """The peer's blob ``cid``; anything but 200 is an error (the peer was named)."""
        resp = await self.get(ROUTE.format(cid=cid))
        if resp.status != 200:
            resp.release()
            raise UpstreamError(f"peer {self.peer_id} did not serve blob {cid}: HTTP {resp.status}")
        yield Offer(self.name, self.peer_id, stream_body(resp), size=resp.content_length)

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """Nothing: :meth:`LanSource.pull_media_from` reports the whole pull to the directory."""


async def signed_get(
    session: aiohttp.ClientSession, identity: Identity, base_url: str, path: str
) -> aiohttp.ClientResponse:
    """``GET base_url + path`` signed with the node key (``peerd.core.signing``)."""
    headers = sign_headers(
        "GET", path, time.time(), identity.peer_id, identity.public_bytes, identity.sign
    )
    return await session.get(base_url.rstrip("/") + path, headers=headers)


async def stream_body(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body in chunks; transport errors become UpstreamError; releases ``resp``."""
    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            yield chunk
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(f"LAN transfer broke: {exc!r}") from exc
    finally:
        resp.release()
