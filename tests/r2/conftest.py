"""Fixtures shared by the R2 tests: a moto server, a bucket per test, a fault proxy, a client."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from peerd.catalog.outbox import Outbox
from peerd.core.outbox import RetryPolicy
from peerd.replication.r2 import R2Client, R2Config
from peerd.replication.service import Replicator
from peerd.runtime import Runtime
from tests.support.faultproxy import FaultProxy
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, MotoServer

FAST = RetryPolicy(lease_s=30, base_s=0.01, max_s=0.05, max_attempts=8)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = "peerd-" + secrets.token_hex(4)
    moto.create_bucket(name)
    return name


@pytest.fixture
async def proxy(moto: MotoServer) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy("127.0.0.1", moto.port).start()
    try:
        yield p
    finally:
        await p.stop()


def make_config(url: str, bucket: str, **kw: object) -> R2Config:
    args: dict[str, object] = {
        "endpoint": url,
        "bucket": bucket,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "max_concurrency": 2,
        "part_size": 5 * 1024 * 1024,
        "multipart_threshold": 5 * 1024 * 1024,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 1.0,
    }
    args.update(kw)
    return R2Config(**args)  # type: ignore[arg-type]


@pytest.fixture
async def client(proxy: FaultProxy, bucket: str) -> AsyncIterator[R2Client]:
    c = R2Client(make_config(proxy.url, bucket))
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def replicator(runtime: Runtime, client: R2Client) -> Replicator:
    return Replicator(runtime, client, outbox=Outbox(runtime.catalog, FAST), concurrency=2)


async def read_all(client: R2Client, key: str) -> bytes | None:
    """A whole object through :meth:`R2Client.open` (None if missing), its length checked."""
    got = await client.open(key)
    if got is None:
        return None
    size, body = got
    try:
        data = b"".join([c async for c in body])
    finally:
        await body.aclose()
    assert len(data) == size
    return data
