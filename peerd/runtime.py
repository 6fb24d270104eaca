"""The runtime: everything a subsystem needs, built once by the daemon and passed in."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerd.catalog import Catalog
from peerd.config import Settings
from peerd.core.access import AccessCounter
from peerd.identity import Identity, load_or_create
from peerd.metrics import Metrics
from peerd.store import BlobStore


@dataclass
class Runtime:
    """Shared handles. Subsystems add fields (with defaults) when other parts need them."""

    settings: Settings
    identity: Identity
    catalog: Catalog
    store: BlobStore
    metrics: Metrics
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    access: AccessCounter = field(default_factory=AccessCounter)
    extras: dict[str, Any] = field(default_factory=dict)

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
    return Runtime(settings=settings, identity=identity, catalog=catalog, store=store, metrics=m)
