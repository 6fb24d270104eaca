"""LAN transfers: the signed node-to-node route and LanSource (shared conformance suite)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from peerd.config import load_settings
from peerd.core.ids import Cid, cid_of
from peerd.core.signing import sign_headers
from peerd.delivery import Resolver
from peerd.http.server import build_app
from peerd.identity import Identity
from peerd.p2p import lan
from peerd.p2p.lan import LanSource, lan_directory
from peerd.runtime import Runtime, open_runtime
from tests.support.source_suite import SourceConformance, SourceFactory
from tests.support.sources import one_rendition


class Peer:
    """A peer node: its runtime and its HTTP app on an ephemeral loopback port."""

    def __init__(self, rt: Runtime, url: str) -> None:
        self.rt = rt
        self.url = url


async def start_peer(
    stack: AsyncExitStack, state: Path, trusted: list[str], *, fetch: bool = False
) -> Peer:
    """A node serving the LAN routes; with ``fetch``, ``POST /p2p/v1/fetch`` through a resolver
    with no source (the store alone)."""
    settings = load_settings(
        None, node={"state_dir": state}, http={"port": 0}, mdns={"trusted_peers": trusted}
    )
    rt = await open_runtime(settings)
    stack.push_async_callback(rt.close)
    rt.node.ready = True
    resolver = Resolver(rt.store, []) if fetch else None
    install = partial(lan.install, directory=lan_directory(rt), resolver=resolver)
    runner = web.AppRunner(build_app(rt, [install]), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Peer(rt, f"http://127.0.0.1:{port}")


async def corrupt(rt: Runtime, cid: Cid, wrong: bytes) -> None:
    path = rt.store.path_for(cid)
    path.chmod(0o644)
    path.write_bytes(wrong)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


class TestLanSource(SourceConformance):
    @pytest.fixture
    def source_factory(
        self, runtime: Runtime, stack: AsyncExitStack, tmp_path: Path
    ) -> SourceFactory:
        async def make(blobs: dict[Cid, bytes], lies: dict[Cid, bytes]) -> LanSource:
            peer = await start_peer(stack, tmp_path / "peer", [runtime.identity.peer_id])
            for cid, data in blobs.items():
                await peer.rt.store.put(data, expected=cid)
            for cid, wrong in lies.items():
                await corrupt(peer.rt, cid, wrong)
            directory = lan_directory(runtime)
            directory.seen(peer.rt.identity.peer_id, url=peer.url)
            source = LanSource(runtime, directory, timeout_s=5)
            stack.push_async_callback(source.close)
            return source

        return make


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, await r.read()


def _signed(ident: Identity, path: str, now: float | None = None) -> dict[str, str]:
    return sign_headers(
        "GET", path, now or time.time(), ident.peer_id, ident.public_bytes, ident.sign
    )


async def test_route_refuses_unsigned_stale_and_unknown(
    stack: AsyncExitStack, tmp_path: Path
) -> None:
    friend, stranger = Identity.generate(), Identity.generate()
    peer = await start_peer(stack, tmp_path / "peer", [friend.peer_id])
    data = os.urandom(5000)
    cid = await peer.rt.store.put(data)
    path = f"/p2p/v1/blobs/{cid}"
    assert (await _get(peer.url + path))[0] == 401
    assert (await _get(peer.url + path, _signed(friend, path, time.time() - 3600)))[0] == 401
    assert (await _get(peer.url + path, _signed(stranger, path)))[0] == 403
    # Signed for another path: refused (signature covers the path).
    other = f"/p2p/v1/blobs/{cid_of(b'x')}"
    assert (await _get(peer.url + path, _signed(friend, other)))[0] == 401
    assert await _get(peer.url + path, _signed(friend, path)) == (200, data)
    missing = f"/p2p/v1/blobs/{cid_of(b'not here')}"
    assert (await _get(peer.url + missing, _signed(friend, missing)))[0] == 404
    bad = "/p2p/v1/blobs/not-a-cid"
    assert (await _get(peer.url + bad, _signed(friend, bad)))[0] == 400


async def test_fastest_peer_first_and_liar_banned(
    runtime: Runtime, stack: AsyncExitStack, tmp_path: Path
) -> None:
    me = runtime.identity.peer_id
    slow = await start_peer(stack, tmp_path / "slow", [me])
    liar = await start_peer(stack, tmp_path / "liar", [me])
    data = os.urandom(100_000)
    cid = await slow.rt.store.put(data)
    await liar.rt.store.put(data)
    await corrupt(liar.rt, cid, bytes(len(data)))
    directory = lan_directory(runtime)
    directory.seen(slow.rt.identity.peer_id, url=slow.url)
    directory.seen(liar.rt.identity.peer_id, url=liar.url)
    directory.rtt(slow.rt.identity.peer_id, 50.0)
    directory.rtt(liar.rt.identity.peer_id, 1.0)
    assert [p.peer_id for p in directory.order()][0] == liar.rt.identity.peer_id
    source = LanSource(runtime, directory, timeout_s=5)
    stack.push_async_callback(source.close)
    resolver = Resolver(runtime.store, [source])
    path = await resolver.ensure_local(cid)
    assert path.read_bytes() == data
    assert resolver.m_fetches.labels(source="lan", outcome="integrity")._value.get() == 1
    assert [p.peer_id for p in directory.order()] == [slow.rt.identity.peer_id]
    await directory.flush()
    async with runtime.catalog.conn.execute(
        "SELECT banned_until FROM peers WHERE peer_id=?", (liar.rt.identity.peer_id,)
    ) as cur:
        row: Any = await cur.fetchone()
    assert row[0] > time.time() + 60  # the ban is persisted


async def test_fetch_route_only_for_operators(stack: AsyncExitStack, tmp_path: Path) -> None:
    friend = Identity.generate()
    peer = await start_peer(stack, tmp_path / "peer", [friend.peer_id], fetch=True)
    data = b"already here"
    cid = await peer.rt.store.put(data)
    path = f"/p2p/v1/fetch/{cid}"
    stranger = Identity.generate()
    async with aiohttp.ClientSession() as s:
        h = sign_headers(
            "POST", path, time.time(), stranger.peer_id, stranger.public_bytes, stranger.sign
        )
        async with s.post(peer.url + path, headers=h) as r:
            assert r.status == 403
        h = sign_headers(
            "POST", path, time.time(), friend.peer_id, friend.public_bytes, friend.sign
        )
        async with s.post(peer.url + path, headers=h) as r:
            assert r.status == 200
            assert await r.json() == {"cid": cid, "size": len(data)}


async def _media_on(rt: Runtime, segments: int = 4) -> tuple[str, dict[Cid, bytes]]:
    """A real (canonical, decodable) manifest whose blobs ``rt`` holds, recorded in its catalog."""
    from peerd.catalog.media import record_media
    from peerd.core import manifest as mf

    blobs = {cid_of(b): b for b in [os.urandom(300)] + [os.urandom(5000 + i) for i in range(4)]}
    order = list(blobs)
    for n, (cid, data) in enumerate(blobs.items()):
        await rt.store.put(data, expected=cid, kind="init" if n == 0 else "segment")
    media_id, data = one_rendition(order)
    manifest = mf.decode(data)
    async with rt.catalog.transaction() as tx:
        await record_media(tx, media_id, data, manifest, time.time())
    return media_id, blobs


async def test_pull_media_from_a_named_peer(stack: AsyncExitStack, tmp_path: Path) -> None:
    """The coordinator's prefetch by peer: manifest and blobs verified, rows after the last blob."""
    from peerd.core.peers import Peer as PeerRow
    from peerd.errors import IntegrityError, NotFound

    me = await start_peer(stack, tmp_path / "me", [])
    holder = await start_peer(stack, tmp_path / "holder", [me.rt.identity.peer_id])
    holder_id = holder.rt.identity.peer_id
    media_id, blobs = await _media_on(holder.rt)
    cids = list(blobs)
    directory = lan_directory(me.rt)
    puller = LanSource(me.rt, directory, timeout_s=5)
    stack.push_async_callback(puller.close)

    with pytest.raises(NotFound, match="not a live LAN peer"):
        await puller.pull_media_from(holder_id, media_id)
    directory.seen(holder_id, url=holder.url)
    with pytest.raises(NotFound, match="does not have media"):
        await puller.pull_media_from(holder_id, str(cids[1]))

    # A peer that lies about one segment: it is reported (banned) and nothing is recorded.
    await corrupt(holder.rt, cids[2], b"not the segment")
    with pytest.raises(IntegrityError):
        await puller.pull_media_from(holder_id, media_id)
    assert not directory.known(holder_id)
    assert not await me.rt.store.has(cids[2])
    async with me.rt.catalog.conn.execute("SELECT count(*) FROM media") as cur:
        assert (await cur.fetchone()) == (0,)
    assert (await me.rt.store.verify()).ok

    # Mended, and the ban lifted: the pull resumes, fetching only what it lacks.
    await corrupt(holder.rt, cids[2], blobs[cids[2]])
    directory.table.restore(PeerRow(peer_id=holder_id, url=holder.url, via="mdns"))
    directory.seen(holder_id, url=holder.url)
    held = {c for c in cids if await me.rt.store.has(c)}
    report = await puller.pull_media_from(holder_id, media_id)
    assert report.recorded
    assert report.fetched == len(cids) - len(held)
    for cid, data in blobs.items():
        assert await me.rt.store.read(cid) == data
    async with me.rt.catalog.conn.execute(
        "SELECT r2_state, manifest FROM media WHERE media_id=?", (media_id,)
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    assert row[0] == "none"
    assert cid_of(bytes(row[1])) == media_id
    async with me.rt.catalog.conn.execute(
        "SELECT count(*) FROM segments WHERE media_id=?", (media_id,)
    ) as cur:
        assert (await cur.fetchone()) == (len(cids) - 1,)
    assert (await me.rt.store.verify()).ok
    # Again: nothing to fetch, nothing new recorded.
    again = await puller.pull_media_from(holder_id, media_id)
    assert (again.fetched, again.recorded) == (0, False)


async def test_lan_source_looks_idle_without_a_usable_peer(runtime: Runtime) -> None:
    """The resolver's hint (``idle``): with no LAN peer known, a cold miss asks R2 first."""
    directory = lan_directory(runtime)
    source = LanSource(runtime, directory, timeout_s=5)
    try:
        assert source.idle()
        directory.seen(runtime.identity.peer_id, url="http://127.0.0.1:1")  # this node itself
        assert source.idle()
        other = Identity.generate().peer_id
        directory.seen(other, url=None)  # heard of, but no HTTP address
        assert source.idle()
        directory.seen(other, url="http://127.0.0.1:2")
        assert not source.idle()
    finally:
        await source.close()
