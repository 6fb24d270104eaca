"""Playback analytics, the service: CMCD intake, Prometheus counts, the hourly rollup in SQLite.

The HLS routes (both paths, :mod:`peerd.http.hls` and :mod:`peerd.http.fastpath`) call
:meth:`PlaybackAnalytics.hls` only for a request that carries CMCD (a ``CMCD`` query argument or
``CMCD-*`` header fields); WHEP sessions call :meth:`PlaybackAnalytics.whep` with their peer
connection's statistics, and the swarm player's beacon (:mod:`peerd.http.swarm`)
:meth:`PlaybackAnalytics.swarm` with what the player measured. All are synchronous and cheap:
a parse (:mod:`peerd.core.cmcd`), a dictionary update (:mod:`peerd.core.analytics`) and counter
increments; nothing awaits. :meth:`PlaybackAnalytics.run` ticks the state machine every second
(failures, the anomaly window) and adds the counts to the catalog every
``[analytics] flush_interval_s`` (``peerd.catalog.playback``), pruning rows older than
``retention_days``. The API (``GET /api/v1/analytics``) flushes first, so it reads what
happened up to the request.

The region is ``CF-IPCountry`` only when the request came through a trusted proxy
(``[http] trusted_proxies``, :mod:`peerd.http.clientip`); CMCD is believed for statistics and
never for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.registry import CollectorRegistry

from peerd.catalog import playback as queries
from peerd.catalog.db import Catalog
from peerd.config import AnalyticsSettings
from peerd.core.analytics import (
    PATHS,
    STARTUP_BOUNDS,
    Analytics,
    Anomaly,
    Bounded,
    Dims,
    Event,
    Failed,
    Hit,
    Stalled,
    Started,
    Thresholds,
    codec_family,
    hour_of,
    quantile,
)
from peerd.core.cmcd import Cmcd, CmcdError, parse, parse_headers
from peerd.http.clientip import Network, client_of, trusted_peer

log = logging.getLogger("peerd.http.playback")
_REGION = re.compile(r"[A-Z]{2}")


class PlaybackMetrics:
    """The analytics' Prometheus metrics (labels: codec family, path, region: all bounded)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sessions = Counter(
            "peerd_playback_sessions",
            "Playback sessions by outcome (started, failed: never started), codec family, "
            "delivery path and region",
            ["outcome", "codec", "path", "region"],
            registry=registry,
        )
        self.startup = Histogram(
            "peerd_playback_startup_seconds",
            "Startup time of playback sessions (first request to media buffered)",
            ["codec", "path"],
            buckets=STARTUP_BOUNDS,
            registry=registry,
        )
        self.stalls = Counter(
            "peerd_playback_stalls",
            "Stalls (buffer starvation) reported by players",
            ["codec", "path", "region"],
            registry=registry,
        )
        self.anomalies = Counter(
            "peerd_playback_anomalies",
            "Anomalies raised by the detector, by kind (failure, stall)",
            ["kind"],
            registry=registry,
        )
        self.cmcd_invalid = Counter(
            "peerd_cmcd_invalid",
            "Requests whose CMCD data was malformed (ignored)",
            registry=registry,
        )


class PlaybackAnalytics:
    """CMCD and WHEP intake, the state machine, and its storage."""

    name = "analytics"

    def __init__(
        self,
        catalog: Catalog,
        settings: AnalyticsSettings,
        registry: CollectorRegistry,
        trusted: tuple[Network, ...],
        byte_counts: Callable[[], Mapping[str, float]] = dict,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.trusted = trusted
        self.clock = clock
        self.byte_counts = byte_counts  # bytes served so far by source (sampled at flush)
        self._bytes_seen: dict[str, float] = dict(byte_counts())
        s = settings
        self.core = Analytics(
            clock(),
            startup_timeout_s=s.startup_timeout_s,
            idle_s=s.session_idle_s,
            max_sessions=s.max_sessions,
            thresholds=Thresholds(
                window_s=s.anomaly_window_s,
                min_sessions=s.anomaly_min_sessions,
                z_threshold=s.anomaly_z,
                alpha=s.anomaly_alpha,
            ),
        )
        self.m = PlaybackMetrics(registry)
        self.regions = Bounded(s.max_regions)
        self._anomalies: list[Anomaly] = []  # raised, not stored yet
        self._flushing = asyncio.Lock()

    # -- intake (synchronous: called on the request path) ---------------------------------

    def hls(
        self,
        media_id: str,
        rendition: str,
        codec: str,
        *,
        playlist: bool,
        token: str | None,
        peer: str,
        headers: Mapping[str, str],
        query: str | None,
        encoded: bool = False,
        path: str = "http",
    ) -> None:
        """A request of an HLS viewer with its CMCD (``query``: the ``CMCD`` argument's value,
        ``encoded`` when still URL-encoded; else the ``CMCD-*`` header fields)."""
        data: Cmcd | CmcdError | None = (
            parse(query, encoded=encoded) if query is not None else parse_headers(headers)
        )
        if data is None:
            return
        if isinstance(data, CmcdError):
            self.m.cmcd_invalid.inc()
            return
        if data.sid:
            session = f"{media_id}|{data.sid}"
        else:
            client = client_of(peer, headers.get("cf-connecting-ip"), self.trusted)
            session = f"{media_id}|{token or ''}|{client}"
        dims = Dims(media_id, rendition, codec, path, self._region(peer, headers))
        now = self.clock()
        self._apply(self.core.observe(Hit(session, dims, playlist, data), now))

    def whep(
        self,
        session: str,
        media_id: str,
        rendition: str,
        codec: str,
        *,
        startup_s: float | None,
        freezes: int,
    ) -> None:
        """A WHEP session's statistics from its peer connection: its startup once the viewer
        received media, its freezes so far (no region: the offer's request is not kept)."""
        dims = Dims(media_id, rendition, codec, "whep", "")
        self._apply(
            self.core.reported(
                f"{media_id}|whep|{session}",
                dims,
                startup_s=startup_s,
                stalls=freezes,
                failed=False,
                now=self.clock(),
            )
        )

    def swarm(
        self,
        session: str,
        media_id: str,
        codec: str,
        *,
        peer: str,
        headers: Mapping[str, str],
        startup_s: float | None,
        stalls: int,
        failed: bool,
    ) -> None:
        """A swarm player's beacon: what it measured itself (startup, stalls, gave up)."""
        dims = Dims(media_id, "", codec, "swarm", self._region(peer, headers))
        now = self.clock()
        self._apply(
            self.core.reported(
                f"{media_id}|swarm|{session}",
                dims,
                startup_s=startup_s,
                stalls=stalls,
                failed=failed,
                now=now,
            )
        )

    def _region(self, peer: str, headers: Mapping[str, str]) -> str:
        country = headers.get("cf-ipcountry")
        if not country or not trusted_peer(peer, self.trusted):
            return ""
        country = country.strip().upper()
        return country if _REGION.fullmatch(country) else ""

    def _apply(self, events: list[Event]) -> None:
        m = self.m
        for e in events:
            if isinstance(e, Anomaly):
                m.anomalies.labels(kind=e.kind).inc()
                self._anomalies.append(e)
                log.warning(
                    "playback anomaly",
                    extra={
                        "kind": e.kind,
                        "codec": e.codec,
                        "region": e.region,
                        "baseline": round(e.baseline, 4),
                        "observed": round(e.observed, 4),
                        "z": round(e.z, 2),
                        "sessions": e.sessions,
                        "explained": e.explain(),
                    },
                )
                continue
            d = e.dims
            codec, path = codec_family(d.codec), d.path if d.path in PATHS else "http"
            region = self.regions(d.region)
            if isinstance(e, Started):
                m.sessions.labels("started", codec, path, region).inc()
                m.startup.labels(codec, path).observe(e.startup_s)
            elif isinstance(e, Failed):
                m.sessions.labels("failed", codec, path, region).inc()
            elif isinstance(e, Stalled):
                m.stalls.labels(codec, path, region).inc()

    # -- the service -----------------------------------------------------------------------

    def recent(self) -> list[Anomaly]:
        """The latest anomalies raised (newest last, at most 50; for the dashboard and the
        coordinator heartbeat)."""
        return list(self.core.recent)

    async def run(self, ready: Callable[[], None]) -> None:
        """Tick every second; store the counts every ``flush_interval_s``."""
        ready()
        await self.prune()
        last_flush = last_prune = time.monotonic()
        try:
            while True:
                await asyncio.sleep(1.0)
                self._apply(self.core.tick(self.clock()))
                mono = time.monotonic()
                if mono - last_flush >= self.settings.flush_interval_s:
                    last_flush = mono
                    await self.flush()
                if mono - last_prune >= 3600:
                    last_prune = mono
                    await self.prune()
        finally:
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """Decide what is due, then add the counts since the last flush to the catalog."""
        async with self._flushing:
            now = self.clock()
            self._apply(self.core.tick(now))
            rows: list[tuple[tuple[Any, ...], tuple[float, ...]]] = []
            for (hour, d), b in self.core.drain().items():
                key = (hour, d.media, d.rendition[:64], d.codec[:64], d.path, d.region)
                counts = (
                    b.sessions,
                    b.started,
                    b.failures,
                    b.stalls,
                    b.stalled_sessions,
                    b.startup_sum,
                    *b.startup_hist,
                )
                rows.append((key, counts))
            seen = self.byte_counts()
            hour = hour_of(now)
            deltas = {
                (hour, source): int(n - self._bytes_seen.get(source, 0))
                for source, n in seen.items()
            }
            self._bytes_seen = dict(seen)
            anomalies = [
                (a.at, a.kind, a.codec, a.region, a.baseline, a.observed, a.z, a.sessions)
                for a in self._anomalies
            ]
            self._anomalies = []
            if rows or anomalies or any(deltas.values()):
                await queries.add_rollup(self.catalog, rows, deltas, anomalies)

    async def prune(self) -> None:
        """Delete rollup rows older than ``retention_days``."""
        await queries.prune(self.catalog, self.clock() - self.settings.retention_days * 86400)

    async def report(
        self,
        since: int | None,
        until: int | None,
        group_by: list[str],
        where: Mapping[str, str],
        limit: int,
    ) -> dict[str, Any]:
        """The rollup summed by ``group_by`` over the hours from ``since`` to ``until`` (Unix
        seconds), bytes by source and the anomalies raised then (what happened up to now
        included: the counts are flushed first)."""
        await self.flush()
        now = int(self.clock())
        end = now if until is None else until
        start = end - 86400 if since is None else since
        rows = await queries.rollup(
            self.catalog, hour_of(start), hour_of(end), group_by, where, limit
        )
        out = []
        for r in rows:
            hist = [int(r[h] or 0) for h in queries.HIST]
            sessions, started = int(r["sessions"] or 0), int(r["started"] or 0)
            stalls = int(r["stalls"] or 0)
            out.append(
                {
                    **{k: r[k] for k in group_by},
                    "sessions": sessions,
                    "started": started,
                    "failures": int(r["failures"] or 0),
                    "success_ratio": started / sessions if sessions else None,
                    "stalls": stalls,
                    "stalled_sessions": int(r["stalled_sessions"] or 0),
                    "stall_rate": stalls / started if started else None,
                    "startup_mean_s": float(r["startup_sum"]) / started if started else None,
                    "startup_p50_s": quantile(hist, 0.5),
                    "startup_p95_s": quantile(hist, 0.95),
                }
            )
        by_source = await queries.bytes_by_source(self.catalog, hour_of(start), hour_of(end))
        peer, http = by_source.get("viewer_peer", 0), by_source.get("viewer_http", 0)
        found = await queries.anomalies(self.catalog, hour_of(start), end + 3600, 100)
        anomalies = [{**a, "explained": Anomaly(**a).explain()} for a in found]
        return {
            "since": hour_of(start),
            "until": end,
            "group_by": group_by,
            "rows": out,
            "bytes": {
                "by_source": by_source,
                "p2p_share": peer / (peer + http) if peer + http else None,
            },
            "anomalies": anomalies,
        }


def served_bytes(registry_counters: list[Counter]) -> Callable[[], dict[str, float]]:
    """Bytes so far by source from ``peerd_bytes_served`` (the node's sources) and
    ``peerd_swarm_viewer_bytes`` (``viewer_peer``, ``viewer_http``)."""
    served, viewers = registry_counters

    def totals() -> dict[str, float]:
        out: dict[str, float] = {}
        for counter, prefix in ((served, ""), (viewers, "viewer_")):
            for metric in counter.collect():
                for s in metric.samples:
                    if s.name.endswith("_total"):
                        key = prefix + s.labels.get("source", "unknown")
                        out[key] = out.get(key, 0.0) + float(s.value)
        return out

    return totals
