"""The /api/v1 routes in-process (aiohttp test server on loopback), every response validated
against the committed OpenAPI document by NodeApiClient; commands with fake subsystems."""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from peerd.api import routes
from peerd.api.commands import Subsystems
from peerd.api.node import NodeApi
from peerd.catalog import Catalog
from peerd.config import load_settings
from peerd.coordinator.client import CoordinatorService
from peerd.core.ids import cid_of
from peerd.core.inventory import digest_of
from peerd.core.signed import PEER_HEADER, SIGNATURE_HEADER, b64url
from peerd.delivery import Resolver
from peerd.errors import ConfigError
from peerd.http.server import build_app
from peerd.identity import Identity
from peerd.media.ingest import node_ingestor
from peerd.runtime import Runtime, open_runtime
from tests.support.coordinator import FakeCoordinator, NodeApiClient
from tests.support.inventory import seed_media
from tests.support.poll import until
from tests.support.replicator import FakeReplicator
from tests.support.sources import MemorySource


@pytest.fixture(autouse=True)
def _quiet_gc() -> None:
    """Collect and freeze what imports left behind, so a full collection (100-200 ms with
    hypothesis, jsonschema and pydantic loaded) does not land inside a test's event loop."""
    gc.collect()
    gc.freeze()


@dataclass
class Api:
    rt: Runtime
    client: NodeApiClient
    token: str
    node: NodeApi

    def wire(self, **parts: Any) -> None:
        """Give the API these subsystems (``resolver``, ``replicator``, ``puller``)."""
        self.node.parts = replace(self.node.parts, **parts)


def serve(rt: Runtime, node: NodeApi | None = None, verifier: Any = None) -> TestServer:
    """The node's app with ``/api/v1/`` answered from ``node`` (default: no subsystems)."""
    install = partial(routes.install, api=node or NodeApi(rt), verifier=verifier)
    return TestServer(build_app(rt, [install]), host="127.0.0.1")


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[Api]:
    token = secrets.token_urlsafe(24)
    sdir = runtime.settings.secrets_path
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "api_token").write_text(token + "\n")
    node = NodeApi(runtime, Subsystems(ingestor=node_ingestor(runtime)))
    server = serve(runtime, node)
    await server.start_server()
    client = NodeApiClient(str(server.make_url("/")), token)
    try:
        yield Api(runtime, client, token, node)
    finally:
        await client.close()
        await node.jobs.close()
        await server.close()


async def test_auth(api: Api) -> None:
    c = api.client
    assert (await c.call("GET", "/api/v1/node", token="")).status == 401
    wrong = await c.call("GET", "/api/v1/node", token=api.token + "x")
    assert wrong.status == 403
    assert wrong.body["error"] == "forbidden"
    assert (await c.call("GET", "/api/v1/node")).status == 200
    async with c.session.get(c.base_url + "/api/v1/openapi.json") as r:
        assert r.status == 200
        assert (await r.json())["openapi"] == "3.1.0"


async def test_no_token_configured_closes_the_api(runtime: Runtime) -> None:
    server = serve(runtime)
    await server.start_server()
    client = NodeApiClient(str(server.make_url("/")), "anything")
    try:
        ans = await client.call("GET", "/api/v1/health")
        assert ans.status == 401
        assert "no api_token" in ans.body["message"]
    finally:
        await client.close()
        await server.close()


async def test_access_jwt_required_without_verifier_refuses_to_start(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    settings = load_settings(None, node={"state_dir": tmp_path}, api={"require_access_jwt": True})
    rt = await open_runtime(settings)
    try:
        with pytest.raises(ConfigError, match="http.access_team_url"):
            build_app(rt, [partial(routes.install, api=NodeApi(rt))])
    finally:
        await rt.close()


async def test_access_service_token_verified_against_the_team(tmp_path: object) -> None:
    """Access mode wired from config: a real RS256 check against a (fake) team's certs."""
    from pathlib import Path

    from tests.support.cf_access import FakeAccessTeam, new_key

    assert isinstance(tmp_path, Path)
    team = FakeAccessTeam(audience="api-aud")
    await team.start()
    settings = load_settings(
        None,
        node={"state_dir": tmp_path},
        http={"access_team_url": team.base_url, "access_aud": "viewer-aud"},
        api={"require_access_jwt": True, "access_aud": "api-aud"},
    )
    rt = await open_runtime(settings)
    settings.secrets_path.mkdir(parents=True)
    (settings.secrets_path / "api_token").write_text("tok")
    server = serve(rt)
    await server.start_server()
    client = NodeApiClient(str(server.make_url("/")), "tok")
    url = client.base_url + "/api/v1/node"
    stranger = await new_key()
    try:
        cases = [
            (team.token(common_name="coordinator.access"), 200),
            (team.token(aud=["viewer-aud"]), 403),  # the viewers' application, not the API's
            (team.token(iss="https://other.cloudflareaccess.com"), 403),
            (team.token(ttl_s=-120), 403),
            (team.token(key=stranger), 403),
        ]
        for jwt, status in cases:
            headers = {"Authorization": "Bearer tok", "Cf-Access-Jwt-Assertion": jwt}
            async with client.session.get(url, headers=headers) as r:
                assert r.status == status, (jwt, await r.text())
        # A right JWT does not stand in for the bearer token.
        headers = {"Cf-Access-Jwt-Assertion": cases[0][0]}
        async with client.session.get(url, headers=headers) as r:
            assert r.status == 401
    finally:
        await client.close()
        await server.close()
        await rt.close()
        await team.stop()


async def test_access_jwt_checked_by_the_wired_verifier(tmp_path: object) -> None:
    from pathlib import Path

    from peerd.errors import Forbidden

    assert isinstance(tmp_path, Path)
    settings = load_settings(None, node={"state_dir": tmp_path}, api={"require_access_jwt": True})
    rt = await open_runtime(settings)
    (settings.secrets_path).mkdir(parents=True)
    (settings.secrets_path / "api_token").write_text("tok")

    class Verifier:
        async def verify(self, token: str) -> object:
            if token != "good-jwt":
                raise Forbidden("bad access token")
            return {"sub": "coordinator"}

    server = serve(rt, verifier=Verifier())
    await server.start_server()
    client = NodeApiClient(str(server.make_url("/")), "tok")
    try:
        assert (await client.call("GET", "/api/v1/node")).status == 401
        url = client.base_url + "/api/v1/node"
        for jwt, status in (("bad", 403), ("good-jwt", 200)):
            headers = {"Authorization": "Bearer tok", "Cf-Access-Jwt-Assertion": jwt}
            async with client.session.get(url, headers=headers) as r:
                assert r.status == status
    finally:
        await client.close()
        await server.close()
        await rt.close()


async def test_node_and_health(api: Api) -> None:
    info = (await api.client.call("GET", "/api/v1/node")).body
    assert info["peer_id"] == api.rt.identity.peer_id
    assert info["capabilities"] == ["challenge", "inventory", "pin", "unpin", "evict"]
    api.wire(replicator=FakeReplicator(api.rt))
    info = (await api.client.call("GET", "/api/v1/node")).body
    assert "promote" in info["capabilities"]
    assert "prefetch:r2" in info["capabilities"]
    health = (await api.client.call("GET", "/api/v1/health")).body
    assert health["status"] == "starting"  # the daemon sets ready once all services run
    assert health["load"]["active_streams_measured"] is False
    assert health["capacity"]["spare_uplink_bps"] is None


async def test_health_reads_load_from_metrics(runtime: Runtime) -> None:
    from prometheus_client import Gauge

    runtime.settings.api.uplink_bps = 1_000_000
    Gauge("peerd_http_active_streams", "x", registry=runtime.metrics.registry).set(3)
    api = NodeApi(runtime)
    served = runtime.metrics.bytes_served.labels(source="local")
    api.sample(now=0.0)
    served.inc(200_000)
    runtime.metrics.bytes_served.labels(source="lan").inc(100_000)
    api.sample(now=1.0)
    health = await api.health()
    assert health.load.active_streams == 3
    assert health.load.active_streams_measured
    assert health.load.egress_bps == 300_000
    assert health.load.egress_measured
    assert health.capacity.spare_uplink_bps == 700_000


async def test_inventory_paging_cursor_and_digest(api: Api) -> None:
    rt, c = api.rt, api.client
    a = await seed_media(rt, "a", segments=3)
    b = await seed_media(rt, "b", segments=2)
    items: list[dict[str, object]] = []
    since = 0
    pages = 0
    while True:
        page = (await c.call("GET", "/api/v1/inventory", params={"since": since, "limit": 3})).body
        items += page["items"]
        since = page["next_since"]
        pages += 1
        if not page["more"]:
            break
    assert pages == 3  # 7 blobs + 2 media, 3 per page
    ids = {(i["kind"], i["id"]) for i in items}
    expected = {("blob", x) for x in a.blobs + b.blobs} | {
        ("media", a.media_id),
        ("media", b.media_id),
    }
    assert ids == expected
    seqs = [int(i["seq"]) for i in items]  # type: ignore[call-overload]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    summary = page["summary"]
    assert summary["digest"] == digest_of(expected)
    assert summary["count"] == 9
    assert summary["seq"] == since

    # Nothing changed: an empty page at the same cursor.
    same = (await c.call("GET", "/api/v1/inventory", params={"since": since})).body
    assert same["items"] == []
    assert same["next_since"] == since
    assert not same["more"]

    # A pin, a deletion: only those come back, the digest follows.
    job = (await c.command("pin", {"media_id": b.media_id})).body
    assert (await c.wait_job(job["job_id"]))["state"] == "done"
    await rt.store.delete(a.segments[0])
    changed = (await c.call("GET", "/api/v1/inventory", params={"since": since})).body
    by_id = {i["id"]: i for i in changed["items"]}
    assert by_id[a.segments[0]]["state"] == "deleted"
    assert by_id[b.media_id]["pinned"] is True
    assert all(by_id[x]["pinned"] for x in b.blobs)
    assert changed["summary"]["digest"] == digest_of(expected - {("blob", a.segments[0])})

    bad = await c.call("GET", "/api/v1/inventory", params={"since": -1})
    assert bad.status == 400
    assert (await c.call("GET", "/api/v1/inventory", params={"limit": 5000})).status == 400


async def test_challenge(api: Api) -> None:
    rt, c = api.rt, api.client
    media = await seed_media(rt, "c", segments=1, size=5000)
    cid = media.segments[0]
    data = media.data[cid]
    fake = FakeCoordinator()
    ch = fake.new_challenge(cid, 100, 1000)
    ans = await c.call("POST", "/api/v1/challenge", body=ch)
    assert ans.status == 200
    peer = rt.identity.peer_id
    assert fake.verify_challenge(peer, ch, ans.raw, ans.headers, data[100:1100]).ok

    # A node that does not hold the bytes cannot answer: a forged hash is refused.
    forged = dict(ans.body, sha256="0" * 64)
    forged_raw = json.dumps(forged).encode()
    signed_forged = dict(ans.headers, **{SIGNATURE_HEADER: b64url(rt.identity.sign(forged_raw))})
    v = fake.verify_challenge(peer, ch, forged_raw, signed_forged, data[100:1100])
    assert not v.ok
    assert "wrong hash" in v.reason
    # The right answer signed by another key (a peer relaying the node's proof) is refused.
    other = Identity.generate()
    relayed = {PEER_HEADER: other.peer_id, SIGNATURE_HEADER: b64url(other.sign(ans.raw))}
    assert not fake.verify_challenge(peer, ch, ans.raw, relayed, data[100:1100]).ok
    wrong_key = {PEER_HEADER: peer, SIGNATURE_HEADER: b64url(other.sign(ans.raw))}
    v = fake.verify_challenge(peer, ch, ans.raw, wrong_key, data[100:1100])
    assert not v.ok
    assert "does not verify" in v.reason
    # An old answer does not answer a new nonce.
    ch2 = dict(ch, nonce=secrets.token_hex(16))
    assert not fake.verify_challenge(peer, ch2, ans.raw, ans.headers, data[100:1100]).ok

    unknown = await c.call("POST", "/api/v1/challenge", body=dict(ch, cid=cid_of(b"nope")))
    assert unknown.status == 404
    past = await c.call("POST", "/api/v1/challenge", body=dict(ch, offset=4500, length=1000))
    assert past.status == 416
    assert "past the end" in past.body["message"]
    big = await c.call("POST", "/api/v1/challenge", body=dict(ch, length=4 * 1024 * 1024 + 1))
    assert big.status == 400
    assert (await c.call("POST", "/api/v1/challenge", body={"nonce": "zz"})).status == 400


async def test_pin_unpin_respects_shared_blobs(api: Api) -> None:
    rt, c = api.rt, api.client
    a = await seed_media(rt, "a", segments=2)
    b = await seed_media(rt, "b", segments=1, shared=[a.segments[0]])
    for m in (a, b):
        job = (await c.command("pin", {"media_id": m.media_id})).body
        assert (await c.wait_job(job["job_id"]))["state"] == "done"
    job = (await c.command("unpin", {"media_id": a.media_id})).body
    done = await c.wait_job(job["job_id"])
    assert done["result"] == {"blobs_unpinned": 2, "blobs_kept_pinned": 1}
    rows = await rt.catalog.get_blobs(a.blobs)
    assert rows[a.segments[0]].pinned  # still in b, which is pinned
    assert not rows[a.segments[1]].pinned
    assert not rows[a.init].pinned
    missing = await c.command("pin", {"media_id": cid_of(b"unknown")})
    assert missing.status == 404


async def test_evict_never_drops_last_copy_or_pinned(api: Api) -> None:
    rt, c = api.rt, api.client
    m = await seed_media(rt, "e", segments=3)
    async with rt.catalog.transaction() as tx:
        await tx.execute(
            "UPDATE blobs SET r2_state='present' WHERE cid IN (?, ?)", (m.segments[0], m.init)
        )
        await tx.execute("UPDATE blobs SET pinned=1 WHERE cid=?", (m.init,))
    used = rt.store.used_bytes
    job = (await c.command("evict", {"media_id": m.media_id})).body
    done = await c.wait_job(job["job_id"])
    assert done["result"] == {
        "evicted": 1,
        "bytes_freed": 2000,
        "kept_last_copy": 2,
        "kept_pinned": 1,
        "not_held": 0,
    }
    assert not rt.store.path_for(m.segments[0]).exists()
    assert (await rt.catalog.get_blob(m.segments[0])).local_state == "absent"  # type: ignore[union-attr]
    assert all(rt.store.path_for(x).exists() for x in (m.init, m.segments[1], m.segments[2]))
    assert rt.store.used_bytes == used - 2000
    by_cids = await c.command("evict", {"cids": [m.segments[1], cid_of(b"zz")]})
    assert (await c.wait_job(by_cids.body["job_id"]))["result"]["not_held"] == 1
    both = await c.command("evict", {"media_id": m.media_id, "cids": [m.init]})
    assert both.status == 400


async def test_promote_then_evict_then_prefetch_from_r2(api: Api) -> None:
    rt, c = api.rt, api.client
    m = await seed_media(rt, "p", segments=3)
    nope = await c.command("promote", {"media_id": m.media_id})
    assert nope.status == 409
    assert nope.body["error"] == "not_configured"
    rep = FakeReplicator(rt, upload_delay_s=0.05)
    api.wire(replicator=rep)
    job = (await c.command("promote", {"media_id": m.media_id})).body
    again = (await c.command("promote", {"media_id": m.media_id})).body
    assert again["job_id"] == job["job_id"]  # one open job per command and target
    done = await c.wait_job(job["job_id"])
    assert done["state"] == "done"
    assert done["result"]["state"] == "done"
    assert set(rep.r2) == set(m.blobs)
    rows = await rt.catalog.get_blobs(m.blobs)
    assert all(r.r2_state == "present" for r in rows.values())

    ev = await c.wait_job((await c.command("evict", {"media_id": m.media_id})).body["job_id"])
    assert ev["result"]["evicted"] == 4
    assert not any(await asyncio.gather(*(rt.store.has(x) for x in m.blobs)))

    pf = (await c.command("prefetch", {"media_id": m.media_id, "source": "r2"})).body
    done = await c.wait_job(pf["job_id"])
    assert done["state"] == "done"
    assert done["result"]["fetched"] == 4
    assert all([await rt.store.has(x) for x in m.blobs])


async def test_prefetch_through_the_resolver(api: Api) -> None:
    rt, c = api.rt, api.client
    m = await seed_media(rt, "r", segments=3)
    for cid in m.segments:
        await rt.store.evict_local(cid)
    no_route = await c.command("prefetch", {"media_id": m.media_id})
    assert no_route.status == 409
    source = MemorySource(name="lan", blobs={x: m.data[x] for x in m.segments})
    api.wire(resolver=Resolver(rt.store, [source]))
    job = (await c.command("prefetch", {"media_id": m.media_id})).body
    done = await c.wait_job(job["job_id"])
    assert done["state"] == "done"
    assert done["result"] == {"source": "any", "blobs": 4, "fetched": 3}
    assert sorted(source.requests) == sorted(m.segments)
    # A source that lacks a blob: the job fails with a reason, nothing half-claimed.
    await rt.store.evict_local(m.segments[0])
    source.blobs.clear()
    job = (await c.command("prefetch", {"media_id": m.media_id})).body
    failed = await c.wait_job(job["job_id"])
    assert failed["state"] == "failed"
    assert "could not be fetched" in failed["error"]
    peer = await c.command(
        "prefetch", {"media_id": m.media_id, "source": "peer", "peer_id": rt.identity.peer_id}
    )
    assert peer.status == 409
    assert (await c.command("prefetch", {"media_id": m.media_id, "source": "peer"})).status == 400


async def test_unknown_job_and_draining(api: Api) -> None:
    c = api.client
    assert (await c.job("0" * 32)).status == 404
    assert (await c.job("nothex")).status == 404
    m = await seed_media(api.rt, "d", segments=1)
    api.rt.draining = True
    refused = await c.command("pin", {"media_id": m.media_id})
    assert refused.status == 503


async def test_jobs_open_at_restart_become_failed(runtime: Runtime) -> None:
    now = time.time() - 10
    async with runtime.catalog.transaction() as tx:
        await tx.execute(
            "INSERT INTO api_jobs(job_id, kind, target, params, state, created_at, updated_at) "
            "VALUES(?, 'pin', 'm', '{}', 'running', ?, ?)",
            ("a" * 32, now, now),
        )
    api = NodeApi(runtime)
    assert await api.jobs.recover() == 1
    job = await api.jobs.get("a" * 32)
    assert job.state == "failed"
    assert job.error == "interrupted by restart"


async def test_heartbeats_and_drain_uploads_last_copies(runtime: Runtime) -> None:
    fake = FakeCoordinator()
    url = await fake.start()
    rt = runtime
    rt.settings.coordinator.url = url
    rt.settings.coordinator.heartbeat_interval_s = 1.0
    m = await seed_media(rt, "last", segments=3)
    async with rt.catalog.transaction() as tx:
        await tx.execute("UPDATE blobs SET r2_state='present' WHERE cid=?", (m.segments[0],))
    rep = FakeReplicator(rt)
    svc = CoordinatorService(rt, NodeApi(rt, Subsystems(replicator=rep)))
    ready = asyncio.Event()
    task = asyncio.create_task(svc.run(ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await fake.wait_for(lambda: len(fake.of_kind("register")) == 1, 10)
        reg = fake.of_kind("register")[0].payload
        assert reg["peer_id"] == rt.identity.peer_id
        assert reg["inventory"]["count"] == 5
        assert reg["draining"] is False
        assert "drain:upload" in reg["capabilities"]
        await fake.wait_for(lambda: len(fake.of_kind("heartbeat")) >= 1, 10)
        fake.heartbeat_interval_s = 30
        await until(lambda: svc.interval_s == 30, timeout_s=10)  # set by the coordinator's answer
        await svc.drain()
        assert rt.draining
        drain = fake.of_kind("drain")
        assert len(drain) == 1
        assert drain[0].payload["draining"] is True
        assert drain[0].payload["drain_deadline_s"] == rt.settings.coordinator.drain_budget_s
        # Every blob R2 lacked went up; the one R2 had did not go again.
        assert sorted(rep.uploads) == sorted(set(m.blobs) - {m.segments[0]})
        rows = await rt.catalog.get_blobs(m.blobs)
        assert all(r.r2_state == "present" for r in rows.values())
        assert not fake.refused
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()


async def test_inventory_sync_model(runtime: Runtime) -> None:
    """A coordinator replica fed only by inventory pages from saved cursors always matches the
    catalog, and its incrementally kept digest matches the node's, over random changes."""
    import random

    from peerd.core.inventory import EMPTY_DIGEST, digest_add, digest_remove

    rng = random.Random(7)  # fixed: reproducible, and no test that could pass by luck alone
    api = NodeApi(runtime)
    cat = runtime.catalog
    ids = [cid_of(bytes([i])) for i in range(12)]
    replica: dict[tuple[str, str], str] = {}
    digest = EMPTY_DIGEST
    cursor = 0

    async def sync() -> None:
        nonlocal cursor, digest
        while True:
            page = await api.inventory(cursor, rng.randint(1, 4))
            for item in page.items:
                key = (item.kind, item.id)
                held_before = replica.get(key) == "present"
                replica[key] = item.state
                held_now = item.state == "present"
                if held_now and not held_before:
                    digest = digest_add(digest, *key)
                elif held_before and not held_now:
                    digest = digest_remove(digest, *key)
            cursor = page.next_since
            if not page.more:
                assert page.summary.digest == digest
                return

    for _ in range(150):
        cid = rng.choice(ids)
        op = rng.randrange(6)
        async with cat.transaction() as tx:
            if op == 0:
                await Catalog.put_blob_row(tx, cid, 10, "segment", 0.0)
            elif op == 1:
                await tx.execute("UPDATE blobs SET local_state='absent' WHERE cid=?", (cid,))
            elif op == 2:
                await tx.execute("DELETE FROM blobs WHERE cid=?", (cid,))
            elif op == 3:
                await tx.execute("UPDATE blobs SET pinned=1-pinned WHERE cid=?", (cid,))
            elif op == 4:
                await tx.execute(
                    "INSERT OR IGNORE INTO media(media_id, manifest, duration_s, created_at) "
                    "VALUES(?, x'00', 1.0, 0)",
                    (cid,),
                )
            else:
                await tx.execute("DELETE FROM media WHERE media_id=?", (cid,))
        if rng.random() < 0.3:
            await sync()
    await sync()
    async with cat.conn.execute("SELECT cid, local_state FROM blobs") as cur:
        truth = {("blob", str(r[0])): str(r[1]) for r in await cur.fetchall()}
    async with cat.conn.execute("SELECT media_id FROM media") as cur:
        truth |= {("media", str(r[0])): "present" for r in await cur.fetchall()}
    assert {k: v for k, v in replica.items() if v != "deleted"} == truth


async def test_prefetch_from_a_named_peer(api: Api) -> None:
    c = api.client
    other = Identity.generate().peer_id
    asked: list[tuple[str, str]] = []

    class Puller:
        async def pull_media_from(
            self, peer_id: str, media_id: str, progress: object = None
        ) -> dict[str, object]:
            asked.append((peer_id, media_id))
            return {"blobs": 3, "fetched": 3}

    api.wire(puller=Puller())
    media_id = cid_of(b"remote manifest")
    body = {"media_id": media_id, "source": "peer", "peer_id": other}
    job = (await c.command("prefetch", body)).body
    done = await c.wait_job(job["job_id"])
    assert done["result"] == {"source": "peer", "peer_id": other, "blobs": 3, "fetched": 3}
    assert asked == [(other, media_id)]
    info = (await c.call("GET", "/api/v1/node")).body
    assert "prefetch:peer" in info["capabilities"]


async def test_ingest_command_inside_the_library_only(api: Api, tmp_path: object) -> None:
    """`POST /commands/ingest`: library folders only, a job that packages and catalogs."""
    from pathlib import Path

    from tests.support.media import make_media

    assert isinstance(tmp_path, Path)
    rt, c = api.rt, api.client
    lib = tmp_path / "library"
    (lib / "shows").mkdir(parents=True)
    clip = lib / "shows" / "clip.mp4"
    await asyncio.to_thread(make_media, clip, seconds=2.0, size=(96, 64))
    outside = tmp_path / "elsewhere.mp4"
    await asyncio.to_thread(outside.write_bytes, b"x")

    none = await c.command("ingest", {"path": str(clip)})
    assert none.status == 409  # no library folder configured yet
    rt.settings.media.library_dirs = [lib]
    assert "ingest" in (await c.call("GET", "/api/v1/node")).body["capabilities"]
    for path, status in (
        (str(outside), 403),
        (str(lib / "shows" / ".." / ".." / "elsewhere.mp4"), 403),
        (str(lib / "missing.mp4"), 404),
        ("relative/clip.mp4", 400),
    ):
        ans = await c.command("ingest", {"path": path})
        assert ans.status == status, (path, ans.body)

    job = await c.command("ingest", {"path": str(clip)})
    assert job.status == 202
    assert job.body["kind"] == "ingest"
    done = await c.wait_job(job.body["job_id"], within_s=60)
    assert done["state"] == "done", done
    (only,) = done["result"]["files"]
    assert only["ok"]
    assert only["new_blobs"] > 0
    async with rt.catalog.conn.execute(
        "SELECT source_path FROM media WHERE media_id=?", (only["media_id"],)
    ) as cur:
        assert (await cur.fetchone()) == (str(clip),)

    # A folder: every media file in it, the bad one reported without stopping the rest.
    await asyncio.to_thread((lib / "shows" / "broken.mp4").write_bytes, b"not media")
    folder = await c.command("ingest", {"path": str(lib)})
    done = await c.wait_job(folder.body["job_id"], within_s=60)
    assert done["state"] == "done", done
    files = {Path(f["path"]).name: f for f in done["result"]["files"]}
    assert files["broken.mp4"]["ok"] is False
    assert files["broken.mp4"]["error"]
    assert files["clip.mp4"]["ok"] is True
    assert done["result"]["failed"] == 1
