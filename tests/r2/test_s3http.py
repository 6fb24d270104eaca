"""The aiohttp hot path of the R2 client against moto over HTTP.

A dedicated moto server with its auth turned on checks every SigV4 signature (moto recomputes
it from what it received): a correct request passes; a wrong secret, a changed signature or a
header changed after signing is refused.
moto checks neither the payload hash nor ``x-amz-checksum-sha256`` against the body (R2 does),
so the client's own guard is tested instead: a blob file that no longer matches its cid is
never sent whole.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import boto3
import pytest
import yarl

from peerd.core.ids import Cid, cid_of
from peerd.delivery import Resolver
from peerd.errors import NotFound
from peerd.replication.r2 import READ_ATTEMPTS, AlreadyExists, R2Client, R2Error, blob_key
from peerd.replication.s3http import EMPTY_SHA256
from peerd.replication.service import Replicator
from peerd.replication.source import R2Source
from peerd.runtime import Runtime
from tests.r2.conftest import make_config, read_all
from tests.support.faultproxy import Fault, FaultProxy, ProxyRequest, method_is
from tests.support.s3server import MotoServer

MIB = 1024 * 1024
SSE_HEADER = "x-amz-server-side-encryption-customer-key"


@pytest.fixture(scope="module")
def authed() -> Iterator[tuple[MotoServer, str, str, str]]:
    """A moto server that checks signatures: (server, bucket, key id, secret).

    moto answers its first N actions without checking; N = the four set-up calls below.
    """
    with MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as server:
        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=server.url,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",  # noqa: S106 -- used before auth is on
            region_name="us-east-1",
        )
        iam.create_user(UserName="peerd")
        iam.put_user_policy(
            UserName="peerd",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="peerd")["AccessKey"]
        bucket = "authed-" + secrets.token_hex(4)
        server.create_bucket(bucket)
        yield server, bucket, str(key["AccessKeyId"]), str(key["SecretAccessKey"])


@pytest.fixture
async def authed_client(authed: tuple[MotoServer, str, str, str]) -> AsyncIterator[R2Client]:
    server, bucket, key_id, secret = authed
    c = R2Client(make_config(server.url, bucket, access_key_id=key_id, secret_access_key=secret))
    try:
        yield c
    finally:
        await c.close()


def write_blob(tmp_path: Path, data: bytes) -> tuple[Cid, Path]:
    cid = cid_of(data)
    path = tmp_path / cid
    path.write_bytes(data)
    return cid, path


async def test_signed_requests_are_accepted(authed_client: R2Client, tmp_path: Path) -> None:
    small = os.urandom(1000)
    big = os.urandom(5 * MIB + 1234)  # multipart: parts over aiohttp, signed with a query
    for data in (small, big):
        cid, path = write_blob(tmp_path, data)
        await authed_client.put_blob(cid, path, len(data))
        assert await authed_client.verify_blob(cid, len(data), path)
        assert await read_all(authed_client, blob_key(cid)) == data
    assert await authed_client.head(blob_key(cid_of(b"absent"))) is None
    assert await read_all(authed_client, blob_key(cid_of(b"absent"))) is None


async def test_wrong_secret_is_refused(authed: tuple[MotoServer, str, str, str]) -> None:
    server, bucket, key_id, _ = authed
    c = R2Client(make_config(server.url, bucket, access_key_id=key_id, secret_access_key="forged"))
    try:
        with pytest.raises(R2Error, match="403"):
            await c.put_bytes("media/x.json", b"{}", content_type="application/json")
        with pytest.raises(R2Error, match="403"):
            await c.head(blob_key(cid_of(b"x")))
    finally:
        await c.close()


async def test_tampered_requests_are_refused(authed_client: R2Client) -> None:
    """moto recomputes each signature: one changed character of it, or of a signed header
    after signing, and the request is refused."""
    data = b"0123456789" * 100
    key = "media/tamper.json"
    await authed_client.put_bytes(key, data, content_type="application/json")
    http = authed_client.http
    url = http.url(key)
    signed = http.sign("GET", url, {"host": http.host, "range": "bytes=0-9"}, EMPTY_SHA256)
    sig = signed["Authorization"]
    forged_sig = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    async with aiohttp.ClientSession() as session:

        async def status(headers: dict[str, str]) -> int:
            async with session.get(yarl.URL(url, encoded=True), headers=headers) as resp:
                await resp.read()
                return resp.status

        assert await status(signed) == 206
        assert await status({**signed, "Authorization": forged_sig}) == 403
        assert await status({**signed, "range": "bytes=0-99"}) == 403


async def test_local_file_not_matching_its_cid_never_completes(
    client: R2Client, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB)
    cid, path = write_blob(tmp_path, data)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # bit rot after the blob was stored
    with pytest.raises(R2Error, match="does not match"):
        await client.put_blob(cid, path, len(data))
    objects = await asyncio.to_thread(moto.objects, bucket)
    assert blob_key(cid) not in objects


async def test_second_put_gets_412_and_object_still_verifies(
    client: R2Client, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(4000)
    cid, path = write_blob(tmp_path, data)
    await client.put_blob(cid, path, len(data))
    with pytest.raises(AlreadyExists):
        await client.put_blob(cid, path, len(data))
    assert await client.verify_blob(cid, len(data), path)
    puts = [e for e in proxy.log if e[0] == "PUT"]
    assert len(puts) == 2


async def test_replicator_treats_412_as_present_after_head(
    runtime: Runtime, replicator: Replicator, client: R2Client, proxy: FaultProxy
) -> None:
    data = os.urandom(5000)
    cid = await runtime.store.put(data)
    await client.put_blob(cid, await runtime.store.open_path(cid), len(data))
    await replicator.push_blob(cid)
    await replicator.run_until_idle(max_wait_s=60)
    row = await runtime.catalog.get_blob(cid)
    assert row is not None
    assert row.r2_state == "present"
    assert proxy.count("PUT", "/blobs/") == 2  # ours above, the job's (answered 412)
    assert proxy.count("HEAD", "/blobs/") == 1


async def test_cut_body_is_resumed_from_where_it_stopped(
    client: R2Client, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(600_000)
    cid, path = write_blob(tmp_path, data)
    await client.put_blob(cid, path, len(data))
    ranges: list[str] = []

    def record(r: ProxyRequest) -> bool:
        if r.method == "GET":
            ranges.append(r.headers.get("range", ""))
        return False

    proxy.add(record, Fault("status"), times=10**6)
    proxy.add(method_is("GET", "/blobs/"), Fault("cut", fraction=0.4))
    got = await client.open(blob_key(cid))
    assert got is not None
    size, body = got
    received = bytearray()
    async for chunk in body:
        received += chunk
        await asyncio.sleep(0)  # a consumer that keeps up, as the store does
    assert bytes(received) == data
    assert ranges[0] == ""
    assert len(ranges) == 2
    assert ranges[1].startswith("bytes=")
    assert 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= 240_000

    # Cut on every attempt: the body fails after READ_ATTEMPTS GETs, with what it had.
    proxy.add(method_is("GET", "/blobs/"), Fault("cut", fraction=0.4), READ_ATTEMPTS)
    with pytest.raises(R2Error, match=f"ended after .* of {len(data)} bytes"):
        await read_all(client, blob_key(cid))
    assert len(ranges) == 2 + READ_ATTEMPTS
    # The connection pool survives the cuts: the next GET is whole.
    assert await read_all(client, blob_key(cid)) == data


async def test_forged_object_is_detected_and_not_stored(
    runtime: Runtime, client: R2Client, moto: MotoServer, bucket: str
) -> None:
    real = os.urandom(300_000)
    cid = cid_of(real)
    forged = os.urandom(len(real))
    await asyncio.to_thread(moto.put, bucket, blob_key(cid), forged)
    assert not await client.verify_blob(cid, len(real), None)
    resolver = Resolver(runtime.store, [R2Source(client)])
    with pytest.raises(NotFound):
        await resolver.ensure_local(cid)
    assert not await runtime.store.has(cid)


async def test_truncated_response_is_not_stored(
    runtime: Runtime, client: R2Client, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(400_000)
    cid, path = write_blob(tmp_path, data)
    await client.put_blob(cid, path, len(data))
    # A shorter body with matching headers: only the hash check can tell.
    proxy.add(method_is("GET", "/blobs/"), Fault("truncate", fraction=0.5))
    resolver = Resolver(runtime.store, [R2Source(client)])
    with pytest.raises(NotFound):
        await resolver.ensure_local(cid)
    assert not await runtime.store.has(cid)


async def test_sse_c_headers_on_every_object_request(
    proxy: FaultProxy, bucket: str, runtime: Runtime, tmp_path: Path
) -> None:
    key = secrets.token_bytes(32)
    seen: list[tuple[str, str, dict[str, str]]] = []

    def record(r: ProxyRequest) -> bool:
        seen.append((r.method, r.path, dict(r.headers)))
        return False

    proxy.add(record, Fault("status"), times=10**6)
    c = R2Client(make_config(proxy.url, bucket, sse_c_key=key))
    try:
        small = os.urandom(2000)
        big = os.urandom(5 * MIB + 10)
        for data in (small, big):
            cid, path = write_blob(tmp_path, data)
            await c.put_blob(cid, path, len(data))
            assert await c.verify_blob(cid, len(data), path)
            assert await read_all(c, blob_key(cid)) == data
    finally:
        await c.close()
    want = {
        "x-amz-server-side-encryption-customer-algorithm": "AES256",
        SSE_HEADER: base64.b64encode(key).decode(),
        SSE_HEADER + "-md5": base64.b64encode(hashlib.md5(key).digest()).decode(),  # noqa: S324
    }
    object_requests = [s for s in seen if "/blobs/" in s[1] and s[0] in ("PUT", "HEAD", "GET")]
    assert {m for m, _, _ in object_requests} == {"PUT", "HEAD", "GET"}
    assert any("partNumber=" in p for _, p, _ in object_requests)
    for method, path, headers in object_requests:
        got = {k: headers.get(k) for k in want}
        assert got == want, (method, path)
        # ...and signed, so nobody on the path can strip or swap the key unnoticed.
        assert SSE_HEADER in headers["authorization"], (method, path)
