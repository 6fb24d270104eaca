"""Daemon wiring: without R2 the node runs without it; with R2 every delivery source is on the
resolver, in delivery order, before any service runs, and the R2 services start."""

from __future__ import annotations

import asyncio

from peerd.daemon import Supervisor, build_services
from peerd.replication.service import Replicator
from peerd.runtime import Runtime
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, MotoServer


async def test_r2_off_when_not_configured(runtime: Runtime) -> None:
    built = await build_services(runtime)
    try:
        names = [s.name for s in built.run]
        assert not any(n.startswith("r2") or n == "replicator" for n in names)
        assert "r2" not in [s.name for s in built.resolver.sources]
        assert built.api.parts.replicator is None
    finally:
        await built.close()


async def test_sources_in_delivery_order_and_r2_services_start(
    runtime: Runtime, moto: MotoServer, bucket: str
) -> None:
    secrets = runtime.settings.secrets_path
    await asyncio.to_thread(secrets.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((secrets / "r2_access_key_id").write_text, ACCESS_KEY)
    await asyncio.to_thread((secrets / "r2_secret_access_key").write_text, SECRET_KEY)
    runtime.settings.r2 = runtime.settings.r2.model_copy(
        update={"endpoint": moto.url, "bucket": bucket, "max_concurrency": 2}
    )
    runtime.settings.mdns.enabled = runtime.settings.p2p.enabled = True
    built = await build_services(runtime)
    try:
        # DESIGN.md's delivery order, fixed when the daemon is built: R2 before the transcoder,
        # or a missing derived blob would be transcoded again although the bucket holds it.
        sources = [s.name for s in built.resolver.sources]
        assert sources == ["lan", "libp2p", "r2", "transcode"]
        assert isinstance(built.api.parts.replicator, Replicator)
        r2_services = [s for s in built.run if s.name in ("replicator", "r2-tiering")]
        assert [s.name for s in r2_services] == ["replicator", "r2-tiering"]
        ready = asyncio.Event()
        sup = Supervisor(r2_services, stop_timeout_s=3, on_ready=ready.set)
        task = asyncio.create_task(sup.run())
        await asyncio.wait_for(ready.wait(), 10)
        sup.request_stop(0)
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        await built.close()
