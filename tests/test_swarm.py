"""The viewer swarm's tracker on a real daemon, driven from outside: the stock
``bittorrent-tracker`` WebSocket client (the one P2P Media Loader uses, in Node, WebRTC by
@roamhq/wrtc) opens a data channel between two viewers through it; raw WebSocket clients check
that offers and answers are relayed byte for byte, that tokens are required, and the limits.

Deadlines are upper bounds for hangs; nothing here is timed."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from peerd.core import tokens
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.support.swarmpeers import announce, binary_id, simulate, swarm_url
from tests.test_libp2p_js_interop import BUNDLED_NODE, JS_DIR

MEDIA = "b" + "a" * 58
OTHER = "b" + "q" * 58
DISABLED = "b" + "d" * 58
SWARM = {
    "max_peers_per_swarm": 10,
    "max_message_bytes": 256 * 1024,  # 5 offers with every candidate of this host
    "messages_per_s": 5.0,
    "announce_interval_s": 5,
    "idle_s": 8.0,
    "disabled_media": [DISABLED],
}


class Node:
    """A started daemon and its viewer signing key."""

    def __init__(self, proc: PeerdProcess) -> None:
        self.proc = proc
        self.key = (proc.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()

    def token(self, media: str = MEDIA, ttl: int = 3600, scope: str = "hls") -> str:
        """A viewer token for ``media``."""
        return tokens.mint(self.key, media, scope, int(time.time()) + ttl)

    def url(self, media: str = MEDIA, token: str | None = None) -> str:
        """The tracker URL of ``media`` with a token (a fresh one by default)."""
        return swarm_url(self.proc.base_url, media, token or self.token(media))

    async def metric(self, name: str, labels: str = "") -> float:
        """One sample of ``/metrics`` (0 when absent)."""
        async with aiohttp.ClientSession() as s, s.get(self.proc.base_url + "/metrics") as r:
            text = await r.text()
        m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    proc = PeerdProcess(
        tmp_path_factory.mktemp("swarm") / "node",
        config={
            "swarm": SWARM,
            "log": {"level": "info"},
            "webrtc": {"ice_servers": ["stun:stun.example.org:3478"]},
        },
    )
    proc.start()
    try:
        yield Node(proc)
    finally:
        proc.stop()


async def recv(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), 30)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    out = json.loads(msg.data)
    assert isinstance(out, dict)
    return out


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 30)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code, str(msg.extra or "")


def run_pair(url_a: str, url_b: str, info_hash: str) -> dict[str, Any]:
    node = str(BUNDLED_NODE) if BUNDLED_NODE.exists() else "node"
    assert (JS_DIR / "node_modules" / "bittorrent-tracker").is_dir(), "run `make js-deps`"
    out = subprocess.run(  # noqa: S603
        [node, str(JS_DIR / "tracker.mjs"), "pair", url_a, url_b, info_hash],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


async def test_stock_client_pair_opens_a_data_channel_and_scrapes(node: Node) -> None:
    info_hash = "5d" * 20
    # two viewers, each with their own token, so each its own socket as in two browsers (the
    # client shares one socket among its clients of one URL)
    url_a, url_b = node.url(token=node.token(ttl=3600)), node.url(token=node.token(ttl=3601))
    result = await asyncio.to_thread(run_pair, url_a, url_b, info_hash)
    assert result["received"] == {"A": "hello from B", "B": "hello from A"}, result
    assert result["scrape"] == {"complete": 0, "incomplete": 2}, result
    assert {"complete": 0, "incomplete": 1} in result["updates"]
    assert not [w for w in result["warnings"] if "failure" in w or "tracker" in w], result
    assert await node.metric("peerd_swarm_relayed_total", '{kind="offer"}') >= 1
    assert await node.metric("peerd_swarm_relayed_total", '{kind="answer"}') >= 1


async def test_fake_offers_and_answers_are_relayed_byte_identical(node: Node) -> None:
    ih, a_id, b_id, offer_id = binary_id(), binary_id(), binary_id(), binary_id()
    sdp_offer = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\nfake offer \u00e9\u4e2d"
    sdp_answer = "v=0\r\nfake answer"
    async with aiohttp.ClientSession() as s:
        a = await s.ws_connect(node.url())
        b = await s.ws_connect(node.url())
        await a.send_str(announce(ih, a_id, event="started"))
        assert (await recv(a))["incomplete"] == 1
        offer = {"type": "offer", "sdp": sdp_offer}
        extra = {"offer_id": offer_id, "offer": offer, "smuggled": "x"}
        await b.send_str(announce(ih, b_id, event="started", offers=[extra], numwant=1))
        reply = await recv(b)
        assert reply == {
            "action": "announce",
            "info_hash": ih,
            "interval": SWARM["announce_interval_s"],
            "complete": 0,
            "incomplete": 2,
        }
        relayed = await recv(a)
        assert relayed == {
            "action": "announce",
            "info_hash": ih,
            "peer_id": b_id,
            "offer_id": offer_id,
            "offer": offer,
        }
        answer = {"type": "answer", "sdp": sdp_answer}
        await a.send_str(announce(ih, a_id, to_peer_id=b_id, offer_id=offer_id, answer=answer))
        assert await recv(b) == {
            "action": "announce",
            "info_hash": ih,
            "peer_id": a_id,
            "offer_id": offer_id,
            "answer": answer,
        }
        # scrape, one hash and the connection's own
        await a.send_str(json.dumps({"action": "scrape", "info_hash": [ih]}))
        scrape = await recv(a)
        assert scrape["files"] == {ih: {"complete": 0, "incomplete": 2, "downloaded": 0}}
        await a.close()
        await b.close()


@pytest.mark.parametrize("case", ["forged", "expired", "other-media", "whep-scope", "missing"])
async def test_a_viewer_without_a_valid_token_for_the_media_cannot_join(
    node: Node, case: str
) -> None:
    good = node.token()
    token = {
        "forged": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "expired": node.token(ttl=-10),
        "other-media": node.token(OTHER),
        "whep-scope": node.token(scope="whep"),
        "missing": "",
    }[case]
    url = swarm_url(node.proc.base_url, MEDIA, token)
    if case == "missing":
        url = url.split("?")[0]
    before = await node.metric("peerd_swarm_rejects_total", '{reason="token"}')
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(url)
    assert err.value.status == 403
    assert await node.metric("peerd_swarm_rejects_total", '{reason="token"}') == before + 1
    # the log says why, never the token
    if token:
        assert token not in node.proc.logs()


async def test_a_token_that_expires_while_connected_closes_the_socket_at_the_next_announce(
    node: Node,
) -> None:
    expires = int(time.time()) + 2
    token = tokens.mint(node.key, MEDIA, "hls", expires)
    ih, pid = binary_id(), binary_id()
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(node.url(token=token))
        await ws.send_str(announce(ih, pid, event="started"))
        assert "interval" in await recv(ws)
        await until(lambda: time.time() > expires + 0.5, timeout_s=30, step_s=0.1)
        await ws.send_str(announce(ih, pid))
        assert await closed(ws) == (1008, "token expired")


async def test_rule_breaking_messages_close_the_socket_with_a_reason(node: Node) -> None:
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(node.url())
        await ws.send_str("hello")
        assert await closed(ws) == (1008, "not JSON")
        ws = await s.ws_connect(node.url())
        await ws.send_str(json.dumps({"action": "connect"}))
        assert await closed(ws) == (1008, "unknown action")
        ws = await s.ws_connect(node.url())
        await ws.send_bytes(b"\x00" * 10)
        assert (await closed(ws))[0] == 1008
        ws = await s.ws_connect(node.url())
        await ws.send_str(announce(binary_id(), binary_id(), pad="x" * 300_000))
        assert (await closed(ws))[0] == 1009
        # over the rate: the burst passes, then the socket is closed
        ws = await s.ws_connect(node.url())
        ih, pid = binary_id(), binary_id()
        for _ in range(200):
            if ws.closed:
                break
            await ws.send_str(announce(ih, pid))
        code, reason = await closed(ws)
        assert (code, reason) == (1008, "over 5 messages/s")
    for reason in ("malformed", "oversized", "rate"):
        assert await node.metric("peerd_swarm_rejects_total", f'{{reason="{reason}"}}') >= 1
    logs = node.proc.logs()
    lines = [json.loads(x) for x in logs.splitlines() if '"swarm reject"' in x]
    assert {line["reason"] for line in lines} >= {"malformed", "oversized", "rate"}


async def test_full_swarm_is_refused_and_idle_sockets_expire(node: Node) -> None:
    ih = binary_id()
    async with aiohttp.ClientSession() as s:
        peers = [await s.ws_connect(node.url()) for _ in range(SWARM["max_peers_per_swarm"])]
        for ws in peers:
            await ws.send_str(announce(ih, binary_id(), event="started"))
            assert "interval" in await recv(ws)
        extra = await s.ws_connect(node.url())
        await extra.send_str(announce(ih, binary_id(), event="started"))
        assert (await recv(extra))["failure reason"] == "swarm full"
        # none of them speaks again: the sweeper closes them after idle_s
        assert await closed(extra) == (1001, "idle for 8 s")
        for ws in peers:
            await closed(ws)
    assert await node.metric("peerd_swarm_rejects_total", '{reason="swarm_full"}') >= 1
    await until(lambda: _no_swarm(node, ih), timeout_s=30, step_s=0.2)


async def _no_swarm(node: Node, ih: str) -> bool:
    return await node.metric("peerd_swarm_connections") == 0


async def test_a_hundred_simulated_peers_announce_and_every_offer_is_answered(
    node: Node,
) -> None:
    swarms = [(MEDIA, node.token(), binary_id()) for _ in range(12)]
    before = await node.metric("peerd_swarm_relayed_total", '{kind="offer"}')
    totals = await simulate(node.proc.base_url, swarms, 100, offers=5)
    assert totals.errors == []
    assert (totals.connected, totals.replies, totals.failures) == (100, 100, 0)
    assert totals.offers > 0
    assert totals.answers == totals.offers
    relayed = await node.metric("peerd_swarm_relayed_total", '{kind="offer"}') - before
    assert relayed == totals.offers


async def test_player_page_scripts_and_byte_beacon(node: Node) -> None:
    """The player page needs the token; its scripts are served; a beacon counts bytes once per
    half interval per viewer, within bounds; a disabled media has no tracker."""
    base = node.proc.base_url
    tok = node.token(ttl=3602)
    report = f"{base}/swarm/{MEDIA}/report?token={tok}"
    peer0 = await node.metric("peerd_swarm_viewer_bytes_total", '{source="peer"}')
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/swarm/player/{MEDIA}") as r:
            assert r.status == 403
        async with s.get(f"{base}/swarm/player/{MEDIA}?token={tok}") as r:
            assert r.status == 200
            page = await r.text()
        assert "/swarm/lib/swarm_player.js" in page
        assert f'"media": "{MEDIA}"' in page
        assert '"p2p": true' in page
        assert '"relayOnly": false' in page
        assert '"iceServers": [{"urls": ["stun:stun.example.org:3478"]}]' in page  # [webrtc]
        async with s.get(f"{base}/swarm/lib/swarm_player.js") as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "validateP2PSegment" in await r.text()
        async with s.get(f"{base}/swarm/lib/p2p-media-loader-core.es.min.js") as r:
            assert r.status == 200
        async with s.post(f"{base}/swarm/{MEDIA}/report?token={node.token(OTHER)}") as r:
            assert r.status == 403
        async with s.post(report, data=b'{"peer": 5000, "http": 1000}') as r:
            assert r.status == 204
        async with s.post(report, data=b'{"peer": 5000, "http": 1000}') as r:
            assert r.status == 429  # the same viewer again within half an interval
        other = f"{base}/swarm/{MEDIA}/report?token={node.token(ttl=3603)}"
        for bad in (b'{"peer": -1, "http": 0}', b'{"peer": 1099511627776, "http": 0}', b"x"):
            async with s.post(other, data=bad) as r:
                assert r.status == 400
        async with s.get(f"{base}/swarm/{DISABLED}?token={node.token(DISABLED)}") as r:
            assert r.status == 403
        async with s.get(f"{base}/swarm/player/{DISABLED}?token={node.token(DISABLED)}") as r:
            assert r.status == 200
            assert '"p2p": false' in await r.text()  # plays over HTTP only
    assert await node.metric("peerd_swarm_viewer_bytes_total", '{source="peer"}') == peer0 + 5000
