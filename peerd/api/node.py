"""What the node knows about itself, as the API and the heartbeat report it.

:class:`NodeApi` is created once by the daemon and shared by the HTTP routes
(:func:`peerd.api.routes.install`) and the coordinator client (which samples load, runs jobs and
puts the same figures in its signed reports).

Load figures come from the metrics registry by name, so this module does not depend on the HTTP
layer's code: ``peerd_http_active_streams`` (a gauge of viewer requests in flight; reported as
unmeasured when absent) and ``peerd_bytes_served`` (the counter of bytes served by source, summed
over sources, sampled every few seconds into a sliding rate).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import time
from pathlib import Path

from peerd import __version__
from peerd.api.commands import Subsystems
from peerd.api.jobs import JobRunner
from peerd.api.models import (
    Addresses,
    Admission,
    Capacity,
    Health,
    Inventory,
    InventoryItem,
    InventorySummary,
    LiveInput,
    LiveStatus,
    Load,
    NodeInfo,
)
from peerd.catalog import inventory as inv
from peerd.core.inventory import EMPTY_DIGEST, RateMeter, digest_of, page_of
from peerd.runtime import Runtime

log = logging.getLogger("peerd.api")

ACTIVE_STREAMS_METRIC = "peerd_http_active_streams"
EGRESS_METRIC = "peerd_bytes_served_total"
OVERFLOW_METRIC = "peerd_uplink_overflow_total"


class NodeApi:
    """Node facts (info, health, inventory) and the command job runner of one runtime."""

    def __init__(self, rt: Runtime, parts: Subsystems | None = None) -> None:
        self.rt = rt
        self.parts = parts or Subsystems()
        self.egress = RateMeter(window_s=30.0)
        self.jobs = JobRunner(
            rt.catalog,
            concurrency=rt.settings.api.job_concurrency,
            keep=rt.settings.api.jobs_kept,
        )
        self._summary: tuple[int, InventorySummary] | None = None
        self._summary_lock = asyncio.Lock()

    # -- load ------------------------------------------------------------------------------------

    def sample(self, now: float | None = None) -> None:
        """Record the served-bytes counter (the API service calls this every few seconds)."""
        total = 0.0
        for metric in self.rt.metrics.registry.collect():
            for s in metric.samples:
                if s.name == EGRESS_METRIC:
                    total += s.value
        self.egress.add(time.monotonic() if now is None else now, total)

    def load(self) -> Load:
        """Active streams and egress rate."""
        streams = self.rt.metrics.registry.get_sample_value(ACTIVE_STREAMS_METRIC)
        return Load(
            active_streams=max(0, int(streams or 0)),
            active_streams_measured=streams is not None,
            egress_bps=max(0.0, round(self.egress.rate(), 1)),
            egress_measured=self.egress.measured,
            swarm_peer_bytes=self._swarm_bytes("peer"),
            swarm_http_bytes=self._swarm_bytes("http"),
        )

    def _swarm_bytes(self, source: str) -> int:
        """Viewer swarm bytes by source the players reported (peerd.http.swarm beacons)."""
        value = self.rt.metrics.registry.get_sample_value(
            "peerd_swarm_viewer_bytes_total", {"source": source}
        )
        return max(0, int(value or 0))

    async def capacity(self, load: Load) -> Capacity:
        """Disk, store and uplink figures."""
        store = self.rt.store
        usage = await asyncio.to_thread(shutil.disk_usage, store.root)
        meter = self.rt.uplink
        if meter.enabled:
            uplink = int(meter.budget_bps)
            spare: int | None = meter.report(time.monotonic()).spare_bps
        else:
            uplink = self.rt.settings.api.uplink_bps
            spare = max(0, int(uplink - load.egress_bps)) if uplink else None
        return Capacity(
            disk_free_bytes=usage.free,
            disk_total_bytes=usage.total,
            store_used_bytes=max(0, store.used_bytes),
            store_blobs=max(0, store.count),
            store_quota_bytes=store.quota_bytes,
            uplink_bps=uplink,
            uplink_source="configured" if uplink else "unknown",
            spare_uplink_bps=spare,
        )

    def admission(self) -> Admission:
        """The uplink admission state and figures (:mod:`peerd.core.uplink`)."""
        r = self.rt.uplink.report(time.monotonic())
        reg = self.rt.metrics.registry
        bucket = self.parts.bucket

        def count(answer: str) -> int:
            n = reg.get_sample_value(OVERFLOW_METRIC, {"answer": answer})
            return int(n or 0)

        return Admission(
            state=r.state,
            budget_bps=r.budget_bps,
            send_bps=r.send_bps,
            spare_bps=r.spare_bps,
            streams=r.streams,
            floor_spare_bps=r.floor_spare_bps,
            spill=bucket is not None and bucket.ready(),
            r2_class_b_left=bucket.class_b_left() if bucket is not None else None,
            redirects=count("redirect"),
            refusals=count("refused"),
        )

    # -- identity ----------------------------------------------------------------------------------

    def capabilities(self) -> list[str]:
        """What this node can do now; depends on which subsystems are wired."""
        caps = ["challenge", "inventory", "pin", "unpin", "evict"]
        if self.parts.resolver is not None:
            caps.append("prefetch:any")
        if self.parts.replicator is not None:
            caps += ["prefetch:r2", "promote", "drain:upload"]
        if self.parts.puller is not None:
            caps.append("prefetch:peer")
        media = self.rt.settings.media
        if media.library_dirs or media.watch_dirs:
            caps.append("ingest")
        return caps

    async def addresses(self) -> Addresses:
        """LAN URLs and libp2p multiaddrs, as the discovery and p2p layers publish them."""
        lan = list(self.rt.node.lan_urls)
        if not lan:
            bound = await asyncio.to_thread(_read_addr, self.rt.settings.state_dir / "http.addr")
            if bound is not None:
                lan.append(bound)
        libp2p = list(self.rt.node.libp2p_addrs)
        return Addresses(lan=lan, libp2p=libp2p)

    async def info(self) -> NodeInfo:
        """``GET /api/v1/node``."""
        s = self.rt.settings
        return NodeInfo(
            peer_id=self.rt.identity.peer_id,
            name=s.node.name,
            version=__version__,
            api_version="1",
            public_url=s.node.public_url,
            addresses=await self.addresses(),
            capabilities=self.capabilities(),
            started_at=self.rt.started_at,
            draining=self.rt.draining,
        )

    async def health(self) -> Health:
        """``GET /api/v1/health``."""
        load = self.load()
        if self.rt.draining:
            status = "draining"
        elif self.rt.node.ready:
            status = "ok"
        else:
            status = "starting"
        return Health(
            status=status,  # type: ignore[arg-type]
            draining=self.rt.draining,
            uptime_s=max(0.0, round(time.time() - self.rt.started_at, 3)),
            load=load,
            capacity=await self.capacity(load),
            admission=self.admission(),
            jobs_active=self.jobs.active,
        )

    # -- live ------------------------------------------------------------------------------------

    def live(self) -> LiveStatus:
        """``GET /api/v1/live``: every configured live input."""
        return LiveStatus(inputs=self.live_inputs() or [])

    def live_inputs(self) -> list[LiveInput] | None:
        """The live inputs for the heartbeat; None on a node with none configured."""
        source = self.parts.live
        if source is None:
            return None
        inputs = [
            LiveInput(
                input=st.input,
                connected=st.connected,
                since=st.since,
                protocol=st.protocol,
                remote=st.remote,
                codecs=list(st.codecs),
                bitrate_bps=st.bitrate_bps,
                viewers=st.viewers,
                latency_s=st.latency_s,
                last_recording=st.last_recording,
                record=st.record,
            )
            for st in source.status()
        ]
        return inputs or None

    # -- inventory ---------------------------------------------------------------------------------

    async def summary(self) -> InventorySummary:
        """Digest, count and high-water mark; recomputed only when something changed."""
        async with self._summary_lock:
            seq = await inv.high_seq(self.rt.catalog)
            if self._summary is not None and self._summary[0] == seq:
                return self._summary[1]
            entries = await inv.held(self.rt.catalog)
            # Hashing every entry is ~1 µs each: off the loop for large catalogs.
            digest = await asyncio.to_thread(digest_of, entries) if entries else EMPTY_DIGEST
            summary = InventorySummary(digest=digest, count=len(entries), seq=seq)
            self._summary = (seq, summary)
            return summary

    async def inventory(self, since: int, limit: int) -> Inventory:
        """One page of changes after ``since`` (see :mod:`peerd.core.inventory`)."""
        rows = await inv.changes(self.rt.catalog, since, limit + 1)
        page = page_of(since, [c.seq for c in rows], limit)
        items = [_item(c) for c in rows[:limit]]
        return Inventory(
            items=items, next_since=page.next_since, more=page.more, summary=await self.summary()
        )


def _item(c: inv.Change) -> InventoryItem:
    if c.deleted:
        state = "deleted"
    else:
        state = "present" if c.kind != "blob" or c.local_state == "present" else "absent"
    return InventoryItem(
        kind=c.kind,  # type: ignore[arg-type]
        id=c.id,
        seq=c.seq,
        state=state,  # type: ignore[arg-type]
        size=c.size,
        blob_kind=c.blob_kind,
        r2_state=c.r2_state,
        pinned=c.pinned,
        title=c.title,
        duration_s=c.duration_s,
    )


def _read_addr(path: Path) -> str | None:
    """The HTTP server's bound address as a LAN URL, unless it is loopback or a wildcard."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified:
        return None
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"
