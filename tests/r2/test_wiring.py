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
    runtime.extras["resolver"] = Resolver(runtime.store, [])
    services = build_replication(runtime)
    assert [s.name for s in services] == ["r2-client", "replicator", "r2-tiering"]
    ready = asyncio.Event()
    sup = Supervisor(services, stop_timeout_s=3, on_ready=ready.set)  # type: ignore[arg-type]
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(ready.wait(), 10)
    assert isinstance(runtime.extras["replicator"], Replicator)
    assert any(isinstance(s, R2Source) for s in runtime.extras["resolver"].sources)
    sup.request_stop(0)
    assert await asyncio.wait_for(task, 10) == 0
