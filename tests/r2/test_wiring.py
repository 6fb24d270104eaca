"""Daemon wiring: without R2 the node runs without it; with R2 the services start and plug in."""

from __future__ import annotations

import asyncio

from peerd.daemon import Supervisor, build_services
from peerd.delivery import Resolver
from peerd.replication import build_replication
from peerd.replication.service import Replicator
from peerd.replication.source import R2Source
from peerd.runtime import Runtime
from peerd.testing.s3server import ACCESS_KEY, SECRET_KEY, MotoServer
from peerd.testing.sources import MemorySource


async def test_r2_off_when_not_configured(runtime: Runtime) -> None:
    assert build_replication(runtime) == []
    names = [s.name for s in build_services(runtime)]
    assert not any(n.startswith("r2") or n == "replicator" for n in names)


async def test_services_start_and_plug_into_the_resolver(
    runtime: Runtime, moto: MotoServer, bucket: str
) -> None:
    secrets = runtime.settings.secrets_path
    await asyncio.to_thread(secrets.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((secrets / "r2_access_key_id").write_text, ACCESS_KEY)
    await asyncio.to_thread((secrets / "r2_secret_access_key").write_text, SECRET_KEY)
    runtime.settings.r2 = runtime.settings.r2.model_copy(
        update={"endpoint": moto.url, "bucket": bucket, "max_concurrency": 2}
    )
    # The transcoder plugs in at build time, R2 only once its client is up: R2 must still come
    # first (DESIGN.md's delivery order), or a missing derived blob would be transcoded again
    # although the bucket holds it.
    runtime.extras["resolver"] = Resolver(runtime.store, [])
    runtime.extras["resolver"].add_source(MemorySource(name="transcode"))
    services = build_replication(runtime)
    assert [s.name for s in services] == ["r2-client", "replicator", "r2-tiering"]
    ready = asyncio.Event()
    sup = Supervisor(services, stop_timeout_s=3, on_ready=ready.set)  # type: ignore[arg-type]
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(ready.wait(), 10)
    assert isinstance(runtime.extras["replicator"], Replicator)
    sources = runtime.extras["resolver"].sources
    assert [s.name for s in sources] == ["r2", "transcode"]
    assert isinstance(sources[0], R2Source)
    sup.request_stop(0)
    assert await asyncio.wait_for(task, 10) == 0
