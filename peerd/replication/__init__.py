"""R2 replication, read-through and tiering.

The node's R2 bucket is the hot tier. This package holds

- :mod:`.r2` -- the S3 client configured for R2 (checksums, key layout, read retries); every
  request goes through :mod:`.s3http` (one aiohttp session, SigV4 from botocore's signer);
- :mod:`.outbox` -- durable jobs in SQLite (decisions in :mod:`peerd.core.outbox`);
- :mod:`.service` -- :class:`Replicator`: outbox workers, promote/demote/pull, last-copy upload;
- :mod:`.source` -- :class:`R2Source`, R2 as a delivery source (read-through);
- :mod:`.tiering` -- :class:`TieringService`: access folding, policy, local eviction;
- :mod:`.cli` -- ``peerd replicate push|pull|status``.

:func:`build_replication` wires it all for the daemon; with R2 not configured it returns no
services and the node runs without R2.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: `peerd ingest` and other CLI commands do not need it
    from peerd.runtime import Runtime

log = logging.getLogger("peerd.replication")


class _R2Lifecycle:
    """Holds the R2 client open while the daemon runs and closes it on stop."""

    name = "r2-client"

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def run(self, ready: Any) -> None:
        import asyncio

        from peerd.delivery import Resolver
        from peerd.replication.metrics import r2_metrics
        from peerd.replication.r2 import R2Client, config_from_settings
        from peerd.replication.service import Replicator
        from peerd.replication.source import R2Source

        cfg = await asyncio.to_thread(config_from_settings, self.rt.settings)
        assert cfg is not None
        metrics = r2_metrics(self.rt.metrics.registry)
        client = await R2Client.create(cfg, on_request=metrics.on_request)
        self.rt.extras["r2_client"] = client
        resolver = self.rt.extras.get("resolver")
        if isinstance(resolver, Resolver):
            resolver.add_source(
                R2Source(
                    client, catalog=self.rt.catalog, timeout_s=self.rt.settings.r2.fetch_timeout_s
                )
            )
        self.rt.extras["replicator"] = Replicator(self.rt, client)
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(client.close())


class _Deferred:
    """Runs a service that :class:`_R2Lifecycle` creates once the client exists."""

    def __init__(self, rt: Runtime, name: str, key: str) -> None:
        self.rt = rt
        self.name = name
        self._key = key

    def _target(self) -> Any:
        if self._key == "replicator":
            return self.rt.extras["replicator"]
        if "tiering" not in self.rt.extras:
            from peerd.replication.tiering import TieringService

            self.rt.extras["tiering"] = TieringService(
                self.rt, self.rt.extras["replicator"], self.rt.extras["r2_client"]
            )
        return self.rt.extras["tiering"]

    async def run(self, ready: Any) -> None:
        await self._target().run(ready)

    async def drain(self) -> None:
        if "replicator" not in self.rt.extras:
            return
        target = self._target()
        drain = getattr(target, "drain", None)
        if drain is not None:
            await drain()


def build_replication(rt: Runtime) -> list[Any]:
    """The replication services (client lifecycle, replicator, tiering), or none without R2."""
    from peerd.replication.r2 import config_from_settings

    if config_from_settings(rt.settings) is None:
        log.info("R2 is not configured; replication and tiering are off")
        return []
    return [
        _R2Lifecycle(rt),
        _Deferred(rt, "replicator", "replicator"),
        _Deferred(rt, "r2-tiering", "tiering"),
    ]


__all__ = ["build_replication"]
