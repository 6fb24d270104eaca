"""HLS delivery: playlists rendered from manifests (held in memory) and blobs by sendfile.

URL layout (see README "HLS URLs"); every URL carries ``?token=`` in token mode::

    /hls/<media_id>/master.m3u8                 master playlist
    /hls/<media_id>/<rendition_id>.m3u8         media playlist of one rendition
    /hls/<media_id>/b/<cid>.<mp4|m4s|ts|vtt>    init (.mp4), media or WebVTT segment by content id
    /hls/<media_id>/s/<rendition_id>/<seq>.<m4s|ts>   segment of an on-demand rendition by number
    /hls/<media_id>/s/<rendition_id>/init.mp4         its init segment (fMP4)

A numbered URL whose blob is not produced yet is produced on that request
(:mod:`peerd.media.ondemand`: single flight, bounded, 503 + ``Retry-After`` past the timeout).

Playlists use relative URIs with the request's own token, so one signed master URL opens
everything of that media and nothing else. A blob URL is served only if the blob belongs to the
media (manifest, or the catalog for on-demand renditions) and its extension matches its role.

Authorization is the one viewer authorization of :mod:`peerd.http.access` with scope ``hls``
(a signed token, or the Cloudflare Access JWT in access mode); every refusal is the same bare 403.

Speed: a parsed manifest and its playlist templates are cached per media id (manifests are
immutable); a playlist response is the template joined with the token. Blobs go out by
``loop.sendfile`` with a strong ETag that is the content id (the same on every node), and
Range, If-Range, If-None-Match and If-Match answered by RFC 9110 (:mod:`peerd.core.validators`:
``bytes=-0`` is 416, an ``If-Range`` that does not match gets the whole body).
Most viewer requests never reach these handlers: :mod:`peerd.http.fastpath` answers plain
GET/HEADs of cached playlists and local blobs on the connection, with the same checks and
headers, and leaves every other case (refusals included) to them.
A blob the node lacks is fetched through the resolver; a plain GET answered by the node's R2
bucket is relayed while it is being stored, so the viewer's first byte waits for R2's only.
Once a media item had a miss, each blob request also starts fetching the next
``http.prefetch_segments`` segments of that rendition that the node lacks
(:meth:`Resolver.prefetch`), so a viewer playing media the node does not hold finds the next
segments held or on their way (joining a fetch in flight costs no second upstream request);
which ones follows the viewer's stream (:mod:`peerd.core.lookahead`), so nothing is fetched
in a rendition its ABR is leaving.

Uplink admission (``[uplink] budget_mbps``, :mod:`peerd.core.uplink`): after the viewer check,
a blob request of a stream (media, client, token; costing the media's bit rate) not admitted
under the budget is answered with a 302 to the bucket (``bucket_url``: presigned or the public
domain) when R2 holds the blob, else 503 + ``Retry-After``; admitted streams are served as
above. A stream the bucket can take is redirected before the budget is reached (at its
``resume_ratio``), so the rest goes to viewers of media only the node can serve. A stream the
bucket cannot take (it lacks the blob, has not answered the HEAD before a redirect within
``retry_after_s``, or there is none) is taken at its lowest rendition's bit rate while the
floors of the streams playing fit the budget (503 past that); meanwhile the master playlist
lists the lowest video variant first, so a new viewer's player starts there. Blob bytes
sent on either path are counted into the uplink meter, and the blobs of answers not sent into
the access counts (tiering sees the demand the uplink could not take).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from prometheus_client import Counter, Gauge

from peerd.catalog.db import BlobRow
from peerd.catalog.media import blob_role, init_cid, media_manifest, segment_cid
from peerd.core.ids import Cid
from peerd.core.lookahead import Lookahead
from peerd.core.manifest import Manifest, PlayOrder, decode
from peerd.core.playlist import MIME_PLAYLIST, UriKind, render_master, render_media
from peerd.core.validators import blob_etag, precondition, select_range
from peerd.delivery.media import MediaResolver
from peerd.delivery.resolver import BlobStream, Resolver
from peerd.errors import Forbidden, NotFound, PeerdError, TooManyRequests, Unavailable
from peerd.http.access import DENIED_BODY, ViewerAuth, viewer_auth
from peerd.http.clientip import client_of
from peerd.http.fastpath import HLS_KEY
from peerd.http.playback import PlaybackAnalytics
from peerd.http.server import HTTP_METRICS_KEY, HttpMetrics
from peerd.runtime import Runtime

log = logging.getLogger("peerd.http.hls")

CONTENT_TYPES = {
    "m3u8": MIME_PLAYLIST,
    "m4s": "video/iso.segment",
    "ts": "video/mp2t",
    "mp4": "video/mp4",
    "vtt": "text/vtt",
}
_PLACEHOLDER = "\x1ftoken\x1f"
_MAX_MEDIA_CACHED = 256
_LOW_FIRST = "master.low"  # the master playlist listing the lowest video variant first


@dataclass
class _Media:
    """A parsed manifest and what is derived from it once."""

    manifest: Manifest
    # cid -> allowed extension for blob URLs (init: mp4, segment: m4s or ts)
    blobs: dict[str, str]
    order: PlayOrder
    templates: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Set once one of its blobs had to be fetched: from then on viewers' next segments are
    # fetched ahead of them (HlsRoutes.fetch_ahead).
    remote: bool = False
    # What one viewer's stream sends (bytes/s): its top rendition of each kind, for admission,
    # and its lowest (a stream admitted at its floor, peerd.core.uplink).
    rate_Bps: float = 0.0
    floor_Bps: float = 0.0
    # playlist name or blob id -> (rendition id, codecs), for playback analytics; the master
    # is the first video variant's (a player that cannot play it stops there).
    where: dict[str, tuple[str, str]] = field(default_factory=dict)


def _stream(media_id: str, token: str | None) -> tuple[str, str] | None:
    """A viewer's stream of a media item, named by its token (None without one)."""
    return (media_id, token) if token else None


def _segment_ext(m: Manifest) -> str:
    return "m4s" if m.container == "fmp4" else "ts"


def _build_media(manifest: Manifest) -> _Media:
    seg_ext = _segment_ext(manifest)
    blobs: dict[str, str] = {}
    for r in manifest.renditions:
        if r.init is not None:
            blobs[r.init] = "mp4"
        for s in r.segments:
            if s.cid is not None:
                blobs.setdefault(s.cid, "vtt" if r.kind == "subtitles" else seg_ext)
    top: dict[str, int] = {}
    low: dict[str, int] = {}
    for r in manifest.renditions:
        bps = r.average_bandwidth or r.bandwidth
        top[r.kind] = max(top.get(r.kind, 0), bps)
        low[r.kind] = min(low.get(r.kind, bps), bps)
    media = _Media(
        manifest,
        blobs,
        PlayOrder.of(manifest),
        rate_Bps=sum(top.values()) / 8,
        floor_Bps=sum(low.values()) / 8,
    )
    for r in manifest.renditions:
        at = (r.id, r.codecs)
        media.where[r.id] = at
        for ref in (r.init, *(s.cid for s in r.segments)):
            if ref is not None:
                media.where.setdefault(ref, at)
        if r.kind == "video" and "master" not in media.where:
            media.where["master"] = ("", r.codecs)

    def uri_for(kind: UriKind, rendition_id: str, ref: str | int | None) -> str:
        if kind == "playlist":
            return f"{rendition_id}.m3u8{_PLACEHOLDER}"
        if kind == "init":
            if ref is None:
                return f"s/{rendition_id}/init.mp4{_PLACEHOLDER}"
            return f"b/{ref}.mp4{_PLACEHOLDER}"
        if kind == "subtitle":
            return f"b/{ref}.vtt{_PLACEHOLDER}"
        if isinstance(ref, int):
            return f"s/{rendition_id}/{ref}.{seg_ext}{_PLACEHOLDER}"
        return f"b/{ref}.{seg_ext}{_PLACEHOLDER}"

    media.templates["master"] = tuple(render_master(manifest, uri_for).split(_PLACEHOLDER))
    low_first = tuple(render_master(manifest, uri_for, lowest_first=True).split(_PLACEHOLDER))
    if low_first != media.templates["master"]:
        media.templates[_LOW_FIRST] = low_first  # not a URL's name: it has a dot
    for r in manifest.renditions:
        media.templates[r.id] = tuple(render_media(manifest, r.id, uri_for).split(_PLACEHOLDER))
    return media


class HlsMetrics:
    """Counters of the HLS routes."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.active = Gauge("peerd_http_active_streams", "Blob responses being sent", registry=reg)
        self.bytes = Counter(
            "peerd_http_blob_bytes",
            "Blob bytes sent to viewers by source and HTTP status",
            ["source", "status"],
            registry=reg,
        )
        self.rejected = Counter(
            "peerd_http_streams_rejected", "Blob requests refused with 429", registry=reg
        )
        self.overflow = rt.metrics.uplink_overflow
        uplink = rt.uplink
        Gauge(
            "peerd_uplink_send_bytes_per_second",
            "Bytes/s sent to viewers and peers over the uplink window",
            registry=reg,
        ).set_function(lambda: uplink.rate(time.monotonic()))
        Gauge(
            "peerd_uplink_budget_bytes_per_second",
            "The uplink budget ([uplink] budget_mbps; 0: admission off)",
            registry=reg,
        ).set(uplink.budget_bps)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BlobUrl(Protocol):
    """Where a viewer may GET a blob the bucket holds (:class:`peerd.replication.source.
    BucketLink`)."""

    def ready(self) -> bool:
        """Whether a link can be given now (the bucket answered lately, budget left)."""

    async def __call__(self, cid: Cid, content_type: str) -> str | None:
        """The URL for ``cid`` (given its Content-Type), or None: the bucket lacks it after
        all, or cannot be asked (then :meth:`ready` says so until it may be asked again)."""


class Producer(Protocol):
    """Makes blobs of on-demand renditions on request (:class:`peerd.media.ondemand.OnDemand`)."""

    async def produce(self, media_id: str, rendition_id: str, seq: int) -> Cid:
        """The blob id of segment ``seq`` (-1: init), produced now if need be."""

    def played(self, media_id: str, rendition_id: str, seq: int, count: int) -> None:
        """A viewer asked for segment ``seq`` of ``count``: produce what follows if in order."""


class HlsRoutes:
    """The handlers and their caches."""

    def __init__(
        self,
        rt: Runtime,
        auth: ViewerAuth,
        metrics: HlsMetrics,
        http_metrics: HttpMetrics,
        resolver: Resolver | None = None,
        ondemand: Producer | None = None,
        finder: MediaResolver | None = None,
        bucket_url: BlobUrl | None = None,
        analytics: PlaybackAnalytics | None = None,
    ) -> None:
        self.rt = rt
        self.analytics = analytics  # None: CMCD is not read
        self.finder = finder  # media the catalog lacks; None: 404
        self.bucket_url = bucket_url  # None: streams over the uplink budget get 503
        self.resolver = resolver  # None: only held blobs are served
        self.ondemand = ondemand  # None: on-demand segments are served once produced only
        self.auth = auth
        self.m = metrics
        self.http_metrics = http_metrics
        cfg = rt.settings.http
        self.cors_origin = cfg.cors_origin
        self.max_streams = cfg.max_streams
        self.timeout_s = cfg.request_timeout_s
        self.prefetch_segments = cfg.prefetch_segments
        self.lookahead = Lookahead(cfg.prefetch_segments)
        self.playlist_cache = f"max-age={cfg.playlist_max_age_s}"
        self.blob_cache = (
            "private, max-age=31536000, immutable"
            if cfg.auth == "access"
            else "public, max-age=31536000, immutable"
        )
        self.streams = 0
        self.playlist_headers = self._cors(
            {"Content-Type": MIME_PLAYLIST, "Cache-Control": self.playlist_cache}
        )
        self._rendered: dict[tuple[str, str, str], bytes] = {}
        self._media: dict[str, _Media] = {}
        self._loading: dict[str, asyncio.Future[_Media]] = {}
        # (playlist, blob) route labels of peerd_http_requests, set by install()
        self.route_names = ("", "")
        # Metric children of the fast path's answers, looked up on first use: label lookups
        # cost more than the increments, and a series appears only once it happened.
        self._children: dict[tuple[str, bool], tuple[Any, Any]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def blob_headers(self, ext: str) -> dict[str, str]:
        """The header fields every answer with a blob of this extension has (a new dict; the
        fast path builds its answers from it too)."""
        return self._cors({"Content-Type": CONTENT_TYPES[ext], "Cache-Control": self.blob_cache})

    def _cors(self, headers: dict[str, str] | None = None) -> dict[str, str]:
        h = headers or {}
        h["Access-Control-Allow-Origin"] = self.cors_origin
        h["Access-Control-Expose-Headers"] = "Content-Length, Content-Range, Accept-Ranges, ETag"
        if self.cors_origin != "*":
            h["Vary"] = "Origin"
        return h

    def wrap(self, handler: Handler) -> Handler:
        """Errors of HLS routes as bare JSON with CORS headers (so players can read the status)."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except PeerdError as exc:
                body = DENIED_BODY if isinstance(exc, Forbidden) else exc.to_json()
                headers = self._cors()
                if exc.retry_after_s is not None:
                    headers["Retry-After"] = str(exc.retry_after_s)
                return web.json_response(body, status=exc.status, headers=headers)

        return wrapped

    async def _load(self, media_id: str) -> _Media:
        raw = await media_manifest(self.rt.catalog, media_id)
        if raw is None:
            if self.finder is None:
                raise NotFound("no such media")
            raw = await self.finder.ensure_media(media_id)  # from the network (404/503)
        return _build_media(decode(raw))

    async def media(self, media_id: str) -> _Media:
        """The cached media (manifests are immutable, so entries never go stale)."""
        hit = self._media.get(media_id)
        if hit is not None:
            return hit
        fut = self._loading.get(media_id)
        if fut is None:
            fut = asyncio.ensure_future(self._load(media_id))
            self._loading[media_id] = fut
            fut.add_done_callback(lambda _f: self._loading.pop(media_id, None))
        media = await asyncio.shield(fut)
        if len(self._media) >= _MAX_MEDIA_CACHED:
            self._media.pop(next(iter(self._media)))
        self._media[media_id] = media
        return media

    def cmcd(
        self,
        media_id: str,
        ref: str,
        token: str | None,
        peer: str,
        headers: Mapping[str, str],
        query: str | None,
        *,
        playlist: bool = False,
        encoded: bool = True,
    ) -> None:
        """Hand a viewer's request with CMCD (``query``: the ``CMCD`` argument, URL-encoded
        unless ``encoded`` is False; None: its ``CMCD-*`` fields) to playback analytics;
        ``ref`` is the playlist name, blob id or rendition id it asked for (a cached media's)."""
        analytics = self.analytics
        media = self._media.get(media_id)
        if analytics is None or media is None:
            return
        rendition, codec = media.where.get(ref, ("", ""))
        analytics.hls(
            media_id,
            rendition,
            codec,
            playlist=playlist,
            token=token,
            peer=peer,
            headers=headers,
            query=query,
            encoded=encoded,
        )

    def _request_cmcd(
        self, request: web.Request, media_id: str, ref: str, token: str | None, playlist: bool
    ) -> None:
        # Parsed only when present: most players send none.
        if self.analytics is None:
            return
        h = request.headers
        query = request.query.get("CMCD") if "CMCD" in request.query_string else None
        if query is None and not any(k in h for k in ("CMCD-Request", "CMCD-Object")):
            if not any(k in h for k in ("CMCD-Session", "CMCD-Status")):
                return
        peer = request.remote or ""
        self.cmcd(media_id, ref, token, peer, h, query, playlist=playlist, encoded=False)

    # -- the fast path's questions (peerd.http.fastpath.Hls) --------------------------------

    def admits(self, media_id: str, token: str | None, headers: Mapping[str, str]) -> bool:
        """Whether the request passes :class:`ViewerAuth` without refusal, await or I/O."""
        jwt = headers.get("cf-access-jwt-assertion")
        return self.auth.admits(token, jwt, media_id, "hls")

    def cached(self, media_id: str) -> bool:
        """Whether the media's manifest is in memory."""
        return media_id in self._media

    async def load(self, media_id: str) -> None:
        """Bring the media's manifest into memory (NotFound if the catalog has none)."""
        await self.media(media_id)

    def playlist_body(self, media_id: str, name: str, token: str | None) -> bytes | None:
        """The playlist of a cached media as :meth:`playlist` sends it, or None."""
        media = self._media.get(media_id)
        found = self._template(media, name) if media is not None else None
        if found is None:
            return None
        # Access mode puts no token in URLs (as the full path: its check returns None).
        name, parts = found
        return self.rendered(media_id, name, token if self.auth.mode == "token" else None, parts)

    def _template(self, media: _Media, name: str) -> tuple[str, tuple[str, ...]] | None:
        """Playlist ``name``'s cache name and template. The master lists the lowest video
        variant first while the node would not take a new viewer of the media at its full
        bit rate (players start with the variant listed first; peerd.core.uplink)."""
        if name == "master" and _LOW_FIRST in media.templates:
            uplink = self.rt.uplink
            if uplink.enabled and not uplink.takes(time.monotonic(), media.rate_Bps):
                name = _LOW_FIRST
        parts = media.templates.get(name)
        return None if parts is None else (name, parts)

    def held_blob(
        self, media_id: str, cid: str, ext: str, token: str | None = None
    ) -> tuple[str, os.stat_result] | None:
        """The file and stat of a held blob of the cached media with this extension, or None
        (``token``: the viewer's, naming its stream for :meth:`fetch_ahead`)."""
        media = self._media.get(media_id)
        if media is None or media.blobs.get(cid) != ext:
            return None
        path = self.rt.store.file_name(Cid(cid))
        try:
            # One stat in a warm directory (as :meth:`_send`), cheaper than a thread hop.
            st = os.stat(path)  # noqa: PTH116
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if media.remote:
            self.fetch_ahead(media, cid, _stream(media_id, token))
        return path, st

    def admitted_stream(
        self, media_id: str, token: str | None, headers: Mapping[str, str], peer: str
    ) -> bool:
        """Whether this viewer's stream of the media is admitted already under the uplink
        budget (:class:`peerd.core.uplink.Uplink`; a stream is media, client and token), or
        admission is off. A new stream is decided by :meth:`_admit` (full path)."""
        uplink = self.rt.uplink
        if not uplink.enabled:
            return True
        client = client_of(peer, headers.get("cf-connecting-ip"), self.auth.trusted)
        return uplink.admitted((media_id, client, token), time.monotonic())

    async def _admit(
        self, request: web.Request, media_id: str, token: str | None, cid: Cid | None, ext: str
    ) -> web.Response | None:
        """None when the viewer's stream is served by the node, else the overflow answer. A
        new stream costs its media's bit rate, one the bucket can take is redirected first,
        and one it cannot may be taken at its lowest rendition's bit rate
        (:class:`peerd.core.uplink.Uplink`, ``spill`` and ``floor_bps``)."""
        headers, peer = request.headers, request.remote or ""
        if self.admitted_stream(media_id, token, headers, peer):
            return None
        row = await self.rt.catalog.get_blob(cid) if cid is not None else None
        spill = (
            row is not None
            and row.r2_state == "present"
            and self.bucket_url is not None
            and self.bucket_url.ready()
        )
        client = client_of(peer, headers.get("cf-connecting-ip"), self.auth.trusted)
        media = self._media.get(media_id)
        cost, floor = (media.rate_Bps, media.floor_Bps) if media is not None else (0.0, 0.0)
        stream = (media_id, client, token)
        uplink = self.rt.uplink
        if uplink.admit(stream, time.monotonic(), cost, spill, floor):
            self._admitted()
            return None
        if spill:
            assert row is not None
            redirect = await self.overflow(row, ext)
            if redirect is not None:
                return redirect
            # The bucket could not take it after all (down, or without the blob): decided
            # again as a stream only the node can serve.
            if uplink.admit(stream, time.monotonic(), cost, False, floor):
                self._admitted()
                return None
        self.refuse(row)

    def _admitted(self) -> None:
        # Admitted in overflow: at its floor (at full cost the state would be open).
        if self.rt.uplink.overflow:
            self.m.overflow.labels(answer="floor").inc()

    async def overflow(self, row: BlobRow, ext: str) -> web.Response | None:
        """A redirect to the bucket for a stream not admitted whose blob the bucket holds, or
        None when the bucket cannot be sent the viewer (it does not answer: no redirect is
        tried again while :meth:`BlobUrl.ready` says no; or it lacks the blob: the catalog is
        corrected)."""
        assert self.bucket_url is not None
        url = await self.bucket_url(row.cid, CONTENT_TYPES[ext])
        if url is None:
            return None
        self.demand(row)
        self.m.overflow.labels(answer="redirect").inc()
        # Never cached: the URL expires, and the node may have room for the stream later.
        headers = self._cors({"Location": url, "Cache-Control": "no-store"})
        return web.Response(status=302, headers=headers)

    def refuse(self, row: BlobRow | None) -> NoReturn:
        """503 with ``Retry-After`` for a stream not admitted that the bucket cannot take (the
        player or coordinator goes elsewhere)."""
        self.demand(row)
        self.m.overflow.labels(answer="refused").inc()
        raise Unavailable(
            "uplink budget reached", retry_after=self.rt.settings.uplink.retry_after_s
        )

    def demand(self, row: BlobRow | None) -> None:
        """Demand turned away is demand all the same: tiering counts it, so media wanted past
        the uplink reach the bucket, and stay there while its viewers are sent to it."""
        if row is not None:
            self.rt.access.record(row.cid, row.size, time.time())

    def open_stream(self) -> bool:
        """Take a blob stream slot (counted in the gauge); False when all are taken."""
        if self.streams >= self.max_streams:
            return False
        self.streams += 1
        self.m.active.inc()
        return True

    def close_stream(self) -> None:
        """Give back a stream slot (taken by :meth:`open_stream` or by an answer sending a blob)."""
        self.streams -= 1
        self.m.active.dec()

    def answered(self, blob: bool, seconds: float) -> None:
        """Count a 200 of the fast path under its route, as the metrics middleware does."""
        requests, latency = self._child(("answered", blob))
        requests.inc()
        latency.observe(seconds)

    def blob_sent(self, cid: str, nbytes: int, *, ok: bool) -> None:
        """Count a held blob sent by the fast path, as :meth:`sent` does."""
        served, sent = self._child(("sent", ok))
        if nbytes:
            self.rt.access.record(cid, nbytes, time.time())
            self.rt.uplink.sent(nbytes, time.monotonic())
            served.inc(nbytes)
        sent.inc(nbytes)

    def _child(self, key: tuple[str, bool]) -> tuple[Any, Any]:
        children = self._children.get(key)
        if children is None:
            kind, flag = key
            if kind == "answered":
                route = self.route_names[flag]
                hm = self.http_metrics
                children = (
                    hm.requests.labels(route=route, status="200"),
                    hm.latency.labels(route=route),
                )
            else:
                status = "200" if flag else "cut"
                children = (
                    self.rt.metrics.bytes_served.labels(source="local"),
                    self.m.bytes.labels(source="local", status=status),
                )
            self._children[key] = children
        return children

    # -- handlers --------------------------------------------------------------------------

    async def preflight(self, request: web.Request) -> web.Response:
        """CORS preflight: hls.js sends Range on segment requests, which needs one."""
        headers = self._cors()
        headers["Access-Control-Allow-Methods"] = "GET, HEAD, OPTIONS"
        headers["Access-Control-Allow-Headers"] = (
            "Range, If-None-Match, If-Modified-Since, "
            "CMCD-Object, CMCD-Request, CMCD-Session, CMCD-Status"
        )
        headers["Access-Control-Max-Age"] = "600"
        return web.Response(status=204, headers=headers)

    async def playlist(self, request: web.Request) -> web.Response:
        """Master (``master.m3u8``) or media playlist (``<rendition>.m3u8``) from memory."""
        match = request.match_info
        media_id = match["media"]
        auth = self.auth
        # Playlists are the request-rate hot path: no coroutine hop for token checks or cached
        # media (each await of a coroutine costs a few microseconds here).
        if auth.mode == "token":
            token = auth.check_token(request, media_id, "hls")
        else:
            token = await auth.check(request, media_id, "hls")
        media = self._media.get(media_id) or await self.media(media_id)
        found = self._template(media, match["name"])
        if found is None:
            raise NotFound("no such playlist")
        self._request_cmcd(request, media_id, match["name"], token, True)
        body = self.rendered(media_id, found[0], token, found[1])
        return web.Response(body=body, headers=self.playlist_headers)

    def rendered(
        self, media_id: str, name: str, token: str | None, parts: tuple[str, ...]
    ) -> bytes:
        """The playlist ``name`` with ``token`` in its URLs (cached per media, name and token)."""
        ck = (media_id, name, token or "")
        body = self._rendered.get(ck)
        if body is None:
            body = (f"?token={token}" if token else "").join(parts).encode()
            if len(self._rendered) >= 4096:
                self._rendered.clear()
            self._rendered[ck] = body
        return body

    async def blob(self, request: web.Request) -> web.StreamResponse:
        """An init or media segment of the media, by content id."""
        media_id = request.match_info["media"]
        token = await self.auth.check(request, media_id, "hls")
        cid, ext = request.match_info["cid"], request.match_info["ext"]
        media = await self.media(media_id)
        expected = media.blobs.get(cid)
        if expected is None:
            expected = await self._catalog_blob_ext(media_id, media, cid)
        if expected != ext:
            raise NotFound("no such blob in this media")
        self._request_cmcd(request, media_id, cid, token, False)
        refused = await self._admit(request, media_id, token, Cid(cid), ext)
        if refused is not None:
            return refused
        return await self._send(request, Cid(cid), ext, media, _stream(media_id, token))

    async def numbered(self, request: web.Request) -> web.StreamResponse:
        """A segment (or init) of an on-demand rendition, produced on its first request."""
        media_id = request.match_info["media"]
        token = await self.auth.check(request, media_id, "hls")
        rid, name, ext = (
            request.match_info["rendition"],
            request.match_info["seq"],
            request.match_info["ext"],
        )
        media = await self.media(media_id)
        r = next((x for x in media.manifest.renditions if x.id == rid), None)
        if r is None:
            raise NotFound("no such rendition")
        if name == "init" and ext == "mp4" and media.manifest.container == "fmp4":
            seq = -1
            cid = await init_cid(self.rt.catalog, media_id, rid)
        elif name.isdigit() and ext == _segment_ext(media.manifest):
            seq = int(name)
            if seq >= len(r.segments):
                raise NotFound("no such segment")
            cid = await segment_cid(self.rt.catalog, media_id, rid, seq)
        else:
            raise NotFound("no such segment")
        self._request_cmcd(request, media_id, rid, token, False)
        refused = await self._admit(request, media_id, token, cid, ext)
        if refused is not None:
            return refused  # a segment not produced yet: 503
        producer = self.ondemand
        if cid is None:
            if producer is None or not r.on_demand:
                raise NotFound("segment not produced yet")
            cid = await producer.produce(media_id, rid, seq)
        if producer is not None and r.on_demand and seq >= 0:
            producer.played(media_id, rid, seq, len(r.segments))
        return await self._send(request, cid, ext)

    async def _catalog_blob_ext(self, media_id: str, media: _Media, cid: str) -> str | None:
        # Blobs of on-demand renditions are not in the manifest; the catalog records them once
        # produced. Positive answers are cached (a blob never leaves a media).
        role = await blob_role(self.rt.catalog, media_id, cid)
        if role is None:
            return None
        ext = "mp4" if role == "init" else _segment_ext(media.manifest)
        media.blobs[cid] = ext
        return ext

    def fetch_ahead(self, media: _Media, cid: str, stream: tuple[str, str] | None = None) -> None:
        """Fetch the segments a viewer of ``media`` will ask for after ``cid``, if not held;
        ``stream`` names the viewer's stream (:mod:`peerd.core.lookahead`; None: unknown)."""
        resolver = self.resolver
        if resolver is None:
            return
        for nxt in self.lookahead.ahead(media.order, cid, stream):
            if not self.rt.store.path_for(Cid(nxt)).is_file():  # noqa: ASYNC240 -- one stat
                resolver.prefetch(Cid(nxt))

    async def _send(
        self,
        request: web.Request,
        cid: Cid,
        ext: str,
        media: _Media | None = None,
        stream: tuple[str, str] | None = None,
    ) -> web.StreamResponse:
        headers = self.blob_headers(ext)
        # The ETag is the content id: a condition is decided before the blob is looked for
        # (a viewer revalidating a segment the node lacks costs no fetch).
        etag = headers["ETag"] = blob_etag(cid)
        h = request.headers
        stop = precondition(etag, h.get("If-Match"), h.get("If-None-Match"))
        if stop is not None:
            if stop == 412:
                headers = self._cors()
            return web.Response(status=stop, headers=headers)
        if self.streams >= self.max_streams:
            self.m.rejected.inc()
            raise TooManyRequests("too many concurrent streams")
        path = self.rt.store.path_for(cid)
        source = "local"
        # One stat of a file in a warm directory: cheaper than a thread hop on every request.
        if not path.is_file():  # noqa: ASYNC240
            resolver = self.resolver
            if resolver is None:
                raise NotFound("blob not held")
            # A whole-body GET starts at once when the node's own bucket answers: its bytes go
            # to the viewer while the resolver verifies and stores them (Resolver.open_stream).
            # Range and HEAD requests, and bytes from peers, get the verified, stored file.
            streamable = request.method == "GET" and "Range" not in request.headers
            self.streams += 1  # a fetch in progress holds a stream slot too
            try:
                async with asyncio.timeout(self.timeout_s):
                    if streamable:
                        got = await resolver.open_stream(cid, known_absent=True)
                    else:
                        fetched, by = await resolver.ensure_local_from(cid)
                        got = BlobStream(fetched, None, by)
            except TimeoutError:
                raise Unavailable("blob fetch timed out") from None
            finally:
                self.streams -= 1
            if media is not None and self.prefetch_segments:
                media.remote = True
                self.fetch_ahead(media, cid, stream)
            if got.chunks is not None:
                return await self._stream(request, cid, got, headers)
            assert got.path is not None
            # The source that delivered the bytes labels them (the dashboard's "P2P savings"
            # reads bytes served by source).
            path, source = got.path, got.source
        elif media is not None and media.remote:
            self.fetch_ahead(media, cid, stream)
        return _BlobResponse(self, cid, source, path, headers=headers)

    async def _stream(
        self, request: web.Request, cid: Cid, got: BlobStream, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Relay a blob arriving from a trusted source while the resolver stores it.

        The resolver releases the last chunk only once the whole blob hashed to its id; if it
        does not, the iterator raises, and the connection is closed short of Content-Length so
        the viewer never holds a complete wrong body.
        """
        assert got.chunks is not None
        resp = web.StreamResponse(headers=headers)
        resp.content_length = got.size
        resp.headers["Accept-Ranges"] = "bytes"
        sent = 0
        ok = False
        self.streams += 1
        self.m.active.inc()
        try:
            await resp.prepare(request)
            async for chunk in got.chunks:
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            ok = True
        except (PeerdError, ConnectionResetError) as exc:
            log.warning("blob relay cut", extra={"cid": cid, "sent": sent, "error": repr(exc)})
            if request.transport is not None:
                request.transport.close()
        finally:
            self.close_stream()
            self.count_sent(cid, got.source, "200" if ok else "cut", sent)
        return resp

    def count_sent(self, cid: Cid, source: str, status: str, nbytes: int) -> None:
        """Account for ``nbytes`` of a blob sent to a viewer (``status``: HTTP status or cut)."""
        if nbytes:
            self.rt.access.record(cid, nbytes, time.time())
            self.rt.uplink.sent(nbytes, time.monotonic())
            self.rt.metrics.bytes_served.labels(source=source).inc(nbytes)
        self.m.bytes.labels(source=source, status=status).inc(nbytes)


class _BlobResponse(web.StreamResponse):
    """A blob from its file by ``loop.sendfile``: the part a Range asks for (see
    :func:`peerd.core.validators.select_range`), counted as an active stream while it is sent.

    aiohttp prepares (sends) the returned response after the handler returns; counting here keeps
    the stream gauge and the 429 cap true to what is on the wire.
    """

    def __init__(
        self, routes: HlsRoutes, cid: Cid, source: str, path: Path, headers: dict[str, str]
    ) -> None:
        super().__init__(headers=headers)
        self.routes = routes
        self.cid = cid
        self.source = source
        self.path = path

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the head and the (partial) body, counted as one active stream."""
        routes = self.routes
        routes.streams += 1
        routes.m.active.inc()
        loop = asyncio.get_running_loop()
        try:
            try:
                f = await loop.run_in_executor(None, self.path.open, "rb")
            except OSError:  # evicted since it was found
                self.set_status(404)
                return await super().prepare(request)
            try:
                size = os.fstat(f.fileno()).st_size
                h = request.headers
                get = request.method == "GET"
                part = select_range(
                    size, self.headers["ETag"], h.get("Range") if get else None, h.get("If-Range")
                )
                self.set_status(part.status)
                self.headers["Accept-Ranges"] = "bytes"
                if (content_range := part.content_range(size)) is not None:
                    self.headers["Content-Range"] = content_range
                self.content_length = part.length
                writer = await super().prepare(request)
                sent = get and part.status < 300
                if sent and part.length:
                    if request.transport is None:
                        raise ConnectionResetError("connection lost")
                    await loop.sendfile(request.transport, f, part.start, part.length)
                    await super().write_eof()
                routes.count_sent(
                    self.cid, self.source, str(part.status), part.length if sent else 0
                )
                return writer
            finally:
                loop.run_in_executor(None, f.close)
        finally:
            routes.close_stream()


def install(
    app: web.Application,
    rt: Runtime,
    resolver: Resolver | None = None,
    ondemand: Producer | None = None,
    finder: MediaResolver | None = None,
    bucket_url: BlobUrl | None = None,
    analytics: PlaybackAnalytics | None = None,
) -> None:
    """Add the HLS routes to ``app``; blobs the node lacks come through ``resolver`` (none: 404),
    on-demand segments not produced yet from ``ondemand`` (none: 404), media the catalog lacks
    through ``finder`` (none: 404); streams over the uplink budget are sent to ``bucket_url``
    (none: 503); requests with CMCD are reported to ``analytics`` (none: not read)."""
    auth = viewer_auth(app, rt)
    routes = HlsRoutes(
        rt,
        auth,
        HlsMetrics(rt),
        app[HTTP_METRICS_KEY],
        resolver,
        ondemand,
        finder,
        bucket_url,
        analytics,
    )
    app[HLS_KEY] = routes
    w = routes.wrap
    media = r"{media:b[a-z2-7]{58}}"
    pl = app.router.add_get(
        f"/hls/{media}/{{name:[a-z0-9][a-z0-9_-]{{0,31}}}}.m3u8", w(routes.playlist)
    )
    blob = app.router.add_get(
        f"/hls/{media}/b/{{cid:b[a-z2-7]{{58}}}}.{{ext:mp4|m4s|ts|vtt}}", w(routes.blob)
    )
    # The fast path (peerd.http.fastpath) counts its requests under the same route labels.
    assert pl.resource is not None
    assert blob.resource is not None
    routes.route_names = (pl.resource.canonical, blob.resource.canonical)
    app.router.add_get(
        f"/hls/{media}/s/{{rendition:[a-z0-9][a-z0-9_-]{{0,31}}}}/{{seq:init|[0-9]{{1,9}}}}"
        ".{ext:mp4|m4s|ts}",
        w(routes.numbered),
    )
    app.router.add_route("OPTIONS", "/hls/{tail:.*}", routes.preflight)
