"""mDNS between two in-process nodes on the loopback interface: discovery with TXT fields and an
RTT probe, re-announcement when the address changes, withdrawal (goodbye) on stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from aiohttp import web

from peerd.config import load_settings
from peerd.discovery.mdns import MdnsService, parse_txt, txt_strings
from peerd.http.server import build_app
from peerd.p2p.lan import lan_directory
from peerd.runtime import Runtime, open_runtime
from tests.support.p2p import loopback_multicast as multicast_on_loopback
from tests.support.poll import until


@pytest.fixture(scope="module")
def loopback_multicast() -> Iterator[None]:
    """mDNS between processes on this host needs the MULTICAST flag on ``lo``."""
    with multicast_on_loopback():
        yield


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


async def start_node(
    stack: AsyncExitStack, state: Path
) -> tuple[Runtime, MdnsService, asyncio.Task[None]]:
    rt = await open_runtime(
        load_settings(
            None,
            node={"state_dir": state, "public_url": "https://media.example.org"},
            mdns={"interfaces": ["127.0.0.1"], "recheck_s": 0.3},
            p2p={"enabled": False},
        )
    )
    stack.push_async_callback(rt.close)
    runner = web.AppRunner(build_app(rt, []), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    svc = MdnsService(rt, lan_directory(rt), lambda: port)
    ready = asyncio.Event()
    task = asyncio.create_task(svc.run(ready.set))

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(stop)
    async with asyncio.timeout(15):
        await ready.wait()
    return rt, svc, task


async def eventually(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (state changed by mDNS callbacks) until true; fail after 15 s."""
    await until(cond, 15, 0.05)


async def test_discover_reannounce_withdraw(
    loopback_multicast: None, stack: AsyncExitStack, tmp_path: Path
) -> None:
    a_rt, a_svc, a_task = await start_node(stack, tmp_path / "a")
    b_rt, b_svc, _ = await start_node(stack, tmp_path / "b")
    a_id, b_id = a_rt.identity.peer_id, b_rt.identity.peer_id
    b_dir, a_dir = b_svc.directory, a_svc.directory
    await eventually(lambda: b_dir.known(a_id) and a_dir.known(b_id))
    peer = b_dir.table.get(a_id)
    assert peer is not None
    assert peer.url == f"http://127.0.0.1:{a_svc.http_port()}"
    assert peer.version
    # What it announces is what the node tells the coordinator (node info's addresses.lan).
    assert a_rt.node.lan_urls == [peer.url]
    await eventually(lambda: (p := b_dir.table.get(a_id)) is not None and p.rtt_ms is not None)

    # The node's address changes: it re-announces and the peer follows.
    a_rt.settings.mdns.advertise_addresses = ["127.0.0.2"]
    await eventually(
        lambda: (
            (p := b_dir.table.get(a_id)) is not None
            and p.url is not None
            and p.url.startswith("http://127.0.0.2:")
        )
    )
    assert a_rt.node.lan_urls == [f"http://127.0.0.2:{a_svc.http_port()}"]
    # Clean stop: goodbye packets, the peer forgets it at once (not after peer_ttl_s).
    a_task.cancel()
    await asyncio.gather(a_task, return_exceptions=True)
    await eventually(lambda: b_dir.table.get(a_id) is None)


def test_txt_round_trip() -> None:
    entries = [b"dnsaddr=/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW", b"x" * 255]
    assert parse_txt(txt_strings(entries)) == entries
    with pytest.raises(ValueError, match="255"):
        txt_strings([b"y" * 256])
