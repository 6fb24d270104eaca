"""What the dashboard shows, gathered from the catalog, the store and the metrics.

Every section is read on its own (the queries are the catalog's: ``peerd.catalog.media``,
``peers``, ``outbox``, ``usage``), as rows by column name; a section whose query fails reports
``{"error": ...}`` instead of taking the whole page down.

Bytes served by source come from the ``peerd_bytes_served{source}`` counter since the daemon
started (sampled into :class:`BandwidthHistory` for the chart) and from the ``usage`` table
(``metric`` starting with ``bytes_served``, ``label`` ``source=<name>``) for daily totals.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from peerd import __version__
from peerd.catalog.media import local_share, media_layout, recent_media, renditions_of
from peerd.catalog.outbox import recent_jobs
from peerd.catalog.peers import recent_peers
from peerd.catalog.usage import daily_bytes_served
from peerd.runtime import Runtime

SOURCES = ("local", "lan", "libp2p", "r2")
P2P_SOURCES = ("lan", "libp2p")
MEDIA_LIMIT = 200


@dataclass
class BandwidthHistory:
    """Cumulative bytes served per source, sampled at a fixed interval (newest last)."""

    max_points: int = 360
    points: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)

    def sample(self, now: float, totals: dict[str, float]) -> None:
        """Record the counter values at ``now``."""
        self.points.append((now, dict(totals)))
        while len(self.points) > self.max_points:
            self.points.popleft()

    def rates(self) -> list[dict[str, Any]]:
        """Bytes per second per source between consecutive samples."""
        out: list[dict[str, Any]] = []
        pts = list(self.points)
        for (t0, a), (t1, b) in zip(pts, pts[1:], strict=False):
            dt = t1 - t0
            if dt <= 0:
                continue
            rate = {s: max(0.0, (b.get(s, 0.0) - a.get(s, 0.0)) / dt) for s in set(a) | set(b)}
            out.append({"t": t1, "bytes_per_s": rate})
        return out


def served_totals(rt: Runtime) -> dict[str, float]:
    """``peerd_bytes_served`` per source since start (every source present, 0 if unseen)."""
    totals = dict.fromkeys(SOURCES, 0.0)
    for metric in rt.metrics.bytes_served.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                totals[s.labels.get("source", "unknown")] = float(s.value)
    return totals


def savings(totals: dict[str, float]) -> dict[str, Any]:
    """P2P savings: bytes that came from peers instead of R2 (the paid origin)."""
    p2p = sum(totals.get(s, 0.0) for s in P2P_SOURCES)
    remote = p2p + totals.get("r2", 0.0)
    total = sum(totals.values())
    return {
        "p2p_bytes": p2p,
        "r2_bytes": totals.get("r2", 0.0),
        "total_bytes": total,
        "share_of_fetched": p2p / remote if remote else None,
        "share_of_served": p2p / total if total else None,
    }


def viewer_swarm(rt: Runtime) -> dict[str, Any]:
    """Segment bytes viewers' players got from each other (uplink bytes the node did not send)
    and over HTTP, as their beacons reported them (:mod:`peerd.http.swarm`)."""
    got = {
        source: float(
            rt.metrics.registry.get_sample_value(
                "peerd_swarm_viewer_bytes_total", {"source": source}
            )
            or 0.0
        )
        for source in ("peer", "http")
    }
    total = got["peer"] + got["http"]
    return {
        "peer_bytes": got["peer"],
        "http_bytes": got["http"],
        "share_from_peers": got["peer"] / total if total else None,
    }


def _pick(row: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: row.get(k) for k in keys}


async def _section(fn: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await fn()
    except (sqlite3.Error, OSError, KeyError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


async def storage(rt: Runtime) -> dict[str, Any]:
    """Blobs held, by kind and state; quota; disk."""
    rows = await rt.catalog.blob_groups()
    by_kind: dict[str, dict[str, int]] = {}
    absent = r2_present = pinned = 0
    for r in rows:
        if r["local_state"] == "present":
            k = by_kind.setdefault(str(r["kind"]), {"blobs": 0, "bytes": 0})
            k["blobs"] += int(r["n"])
            k["bytes"] += int(r["bytes"])
        else:
            absent += int(r["n"])
        if r["r2_state"] == "present":
            r2_present += int(r["n"])
        pinned += int(r["pinned"] or 0)
    disk = await asyncio.to_thread(shutil.disk_usage, rt.settings.state_dir)
    return {
        "blobs": rt.store.count,
        "bytes": rt.store.used_bytes,
        "quota_bytes": rt.settings.store.quota_bytes or None,
        "min_free_bytes": rt.settings.store.min_free_bytes,
        "disk_total_bytes": disk.total,
        "disk_free_bytes": disk.free,
        "by_kind": by_kind,
        "absent_blobs": absent,
        "pinned_blobs": pinned,
        "r2_present_blobs": r2_present,
    }


async def replication(rt: Runtime, now: float) -> dict[str, Any]:
    """The replication outbox: jobs by state and kind, oldest waiting job, recent failures."""
    rows = await recent_jobs(rt.catalog, now - 86400)
    by_state: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    oldest: float | None = None
    failures = []
    for r in rows:
        state, kind = str(r.get("state")), str(r.get("kind"))
        by_state[state] = by_state.get(state, 0) + 1
        if state in ("queued", "running"):
            by_kind[kind] = by_kind.get(kind, 0) + 1
            created = r.get("created_at")
            if isinstance(created, int | float):
                oldest = created if oldest is None else min(oldest, created)
        if r.get("last_error"):
            failures.append(
                _pick(r, ("kind", "target", "state", "attempts", "last_error", "updated_at"))
            )
    failures.sort(key=lambda f: f.get("updated_at") or 0, reverse=True)
    return {
        "by_state": by_state,
        "open_by_kind": by_kind,
        "oldest_open_age_s": (now - oldest) if oldest is not None else None,
        "recent_failures": failures[:10],
    }


async def peers(rt: Runtime, now: float) -> dict[str, Any]:
    """Peers seen, grouped by how they were found (mDNS on the LAN, libp2p, coordinator)."""
    rows = await recent_peers(rt.catalog)
    groups: dict[str, list[dict[str, Any]]] = {"lan": [], "libp2p": [], "other": []}
    for r in rows:
        item = _pick(
            r, ("peer_id", "via", "http_url", "version", "last_seen", "rtt_ms", "failures")
        )
        last = r.get("last_seen")
        item["seen_ago_s"] = now - last if isinstance(last, int | float) else None
        via = str(r.get("via"))
        groups["lan" if via == "mdns" else via if via in groups else "other"].append(item)
    return groups


async def media(rt: Runtime) -> list[dict[str, Any]]:
    """The library, newest first: renditions and how much of each item is on local disk."""
    items = await recent_media(rt.catalog, MEDIA_LIMIT)
    if not items:
        return []
    ids = [m["media_id"] for m in items]
    rends = await renditions_of(rt.catalog, ids)
    local = await local_share(rt.catalog, ids)
    by_media: dict[str, list[dict[str, Any]]] = {}
    for r in rends:
        by_media.setdefault(r["media_id"], []).append(r)
    stats = {r["media_id"]: r for r in local}
    out = []
    for m in items:
        s = stats.get(m["media_id"], {})
        out.append(
            {
                **m,
                "renditions": [
                    _pick(
                        r,
                        (
                            "rendition_id",
                            "kind",
                            "container",
                            "codecs",
                            "bandwidth",
                            "width",
                            "height",
                            "produced",
                        ),
                    )
                    for r in by_media.get(m["media_id"], [])
                ],
                "segments": int(s.get("segments") or 0),
                "local_segments": int(s.get("local_segments") or 0),
                "local_bytes": int(s.get("local_bytes") or 0),
            }
        )
    return out


async def daily_usage(rt: Runtime) -> list[dict[str, Any]]:
    """Bytes served per day and source from the usage table (last 30 days)."""
    rows = await daily_bytes_served(rt.catalog)
    days: dict[str, dict[str, int]] = {}
    for r in rows:
        label = str(r["label"] or "")
        source = label.split("=", 1)[1] if label.startswith("source=") else (label or "all")
        days.setdefault(str(r["day"]), {})[source] = int(r["bytes"] or 0)
    return [{"day": d, "bytes_by_source": v} for d, v in sorted(days.items())][-30:]


async def build_summary(
    rt: Runtime, history: BandwidthHistory, now: float | None = None
) -> dict[str, Any]:
    """The whole ``/ui/api/summary`` document."""
    now = time.time() if now is None else now
    totals = served_totals(rt)
    settings = rt.settings
    return {
        "node": {
            "name": settings.node.name,
            "peer_id": rt.identity.peer_id,
            "version": __version__,
            "public_url": settings.node.public_url,
            "started_at": rt.started_at,
            "uptime_s": now - rt.started_at,
            "ready": rt.node.ready,
            "draining": rt.draining,
            "now": now,
        },
        "storage": await _section(lambda: storage(rt)),
        "replication": await _section(lambda: replication(rt, now)),
        "peers": await _section(lambda: peers(rt, now)),
        "traffic": {
            "bytes_by_source": totals,
            "savings": savings(totals),
            "viewer_swarm": viewer_swarm(rt),
            "rates": history.rates(),
            "sample_interval_s": settings.ui.sample_interval_s,
            "daily": await _section(lambda: daily_usage(rt)),
        },
        "media": await _section(lambda: media(rt)),
    }


async def media_detail(rt: Runtime, media_id: str) -> dict[str, Any] | None:
    """One item with every rendition's init and segment blob ids (for the in-page player)."""
    return await media_layout(rt.catalog, media_id)
