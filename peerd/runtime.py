"""The runtime: the handles every part shares, built once by the daemon and passed in.

Services do not find each other through the runtime: :func:`peerd.daemon.build_services` builds
each one and hands it what it uses. The runtime holds only what every part needs (settings,
identity, catalog, store, metrics, the access counter, the uplink meter) and the node's own facts
(:class:`NodeState`), which one part learns and others report.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from peerd.catalog import Catalog
from peerd.config import Settings
from peerd.core.access import AccessCounter
from peerd.core.uplink import Uplink
from peerd.identity import Identity, load_or_create
from peerd.metrics import Metrics
from peerd.store import BlobStore


@dataclass
class NodeState:
    """Facts about the running node that one part learns and others report."""

    ready: bool = False
    """Every service started (set by the daemon; ``/readyz``, the API's health)."""
    lan_urls: list[str] = field(default_factory=list)
    """Where LAN peers reach this node (set by mDNS; the API's ``addresses.lan``)."""
    libp2p_addrs: list[str] = field(default_factory=list)
    """The libp2p host's listen addresses (set by the p2p service; ``addresses.libp2p``)."""


@dataclass
class Runtime:
    """Shared handles and the node's facts."""

    settings: Settings
    identity: Identity
    catalog: Catalog
    store: BlobStore
    metrics: Metrics
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    access: AccessCounter = field(default_factory=AccessCounter)
    node: NodeState = field(default_factory=NodeState)
    uplink: Uplink = field(default_factory=Uplink)
    """Bytes sent to viewers and peers, and stream admission under ``[uplink] budget_mbps``."""

    async def close(self) -> None:
        """Close the catalog."""
        await self.catalog.close()


async def open_runtime(settings: Settings, *, metrics: Metrics | None = None) -> Runtime:
    """Open the identity, catalog and store of the node described by ``settings``."""
    state: Path = settings.state_dir
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True, mode=0o750)
    identity, _ = await asyncio.to_thread(load_or_create, settings.key_path)
    catalog = await Catalog.open(settings.catalog_path)
    m = metrics or Metrics()

    def on_write(kind: str, size: int) -> None:
        m.store_writes.labels(kind=kind).inc()

    store = BlobStore(
        settings.blob_dir,
        catalog,
        quota_bytes=settings.store.quota_bytes,
        min_free_bytes=settings.store.min_free_bytes,
        on_write=on_write,
    )
    try:
        await store.open()
    except BaseException:
        await catalog.close()
        raise
    up = settings.uplink
    uplink = Uplink(
        budget_bps=up.budget_mbps * 1e6 / 8,
        window_s=up.window_s,
        resume_ratio=up.resume_ratio,
        stream_idle_s=up.stream_idle_s,
        stream_bps=up.stream_mbps * 1e6 / 8,
    )
    return Runtime(
        settings=settings, identity=identity, catalog=catalog, store=store, metrics=m, uplink=uplink
    )
