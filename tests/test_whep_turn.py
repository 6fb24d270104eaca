"""ICE servers minted by (a local fake of) Cloudflare TURN's generate-ice-servers API."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from peerd.config import load_settings
from peerd.core.whep import IceServer
from peerd.errors import ConfigError
from peerd.webrtc import ice
from peerd.webrtc.ice import CloudflareTurn, StaticIce, build_ice_provider, for_aiortc
from tests.support.cf_turn import FakeCloudflareTurn
from tests.support.whep_media import HlsClip, make_hls
from tests.support.whep_viewer import make_offer
from tests.test_whep import SDP, bearer, start_node, with_key


@pytest.fixture
async def fake() -> AsyncIterator[FakeCloudflareTurn]:
    f = await FakeCloudflareTurn().start()
    try:
        yield f
    finally:
        await f.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def provider(fake: FakeCloudflareTurn, clock: Clock, **kw: object) -> CloudflareTurn:
    args: dict[str, object] = {
        "api_url": fake.base_url,
        "key_id": fake.key_id,
        "api_token": fake.api_token,
        "ttl_s": 600,
        "refresh_margin_s": 60.0,
        "clock": clock,
    }
    args.update(kw)
    return CloudflareTurn(**args)  # type: ignore[arg-type]


async def test_mints_caches_and_refreshes_before_expiry(fake: FakeCloudflareTurn) -> None:
    clock = Clock()
    results: list[str] = []
    p = provider(fake, clock, on_fetch=results.append)
    try:
        first = await p.servers()
        assert len(fake.requests) == 1
        req = fake.requests[0]
        assert req["auth"] == f"Bearer {fake.api_token}"
        assert req["ttl"] == 600
        # Passed through as Cloudflare gave it.
        assert [s.to_json() for s in first] == fake.ice_servers(
            req["username"], first[1].credential or ""
        )
        clock.t += 500  # still 100 s left, more than the 60 s margin
        assert await p.servers() == first
        assert len(fake.requests) == 1
        clock.t += 50  # 50 s left: refresh
        second = await p.servers()
        assert len(fake.requests) == 2
        assert second != first
        # Many sessions at once with a stale cache: one request.
        clock.t += 600
        await asyncio.gather(*(p.servers() for _ in range(10)))
        assert len(fake.requests) == 3
        assert results == ["ok", "ok", "ok"]
    finally:
        await p.close()


async def test_failures_keep_unexpired_credentials_then_fall_back(
    fake: FakeCloudflareTurn,
) -> None:
    clock = Clock()
    static = (IceServer(urls=("stun:127.0.0.1:9",)),)
    results: list[str] = []
    p = provider(fake, clock, static=static, on_fetch=results.append)
    try:
        minted = await p.servers()
        assert minted[-1] == static[0]
        assert len(minted) == 3
        fake.fail_next = 10
        clock.t += 580  # inside the margin, not expired: refresh fails, old list still served
        assert await p.servers() == minted
        clock.t += 20  # expired, and the retry pause after a failure is not over
        assert await p.servers() == static
        n = len(fake.requests)
        assert await p.servers() == static
        assert len(fake.requests) == n  # no request during the pause
        clock.t += ice.RETRY_S
        fake.fail_next = 0
        assert len(await p.servers()) == 3
        assert results == ["ok", "error", "ok"]
    finally:
        await p.close()


async def test_wrong_token_or_key_is_an_error_not_a_crash(fake: FakeCloudflareTurn) -> None:
    for kw in ({"api_token": "wrong"}, {"key_id": "0" * 32}):
        results: list[str] = []
        p = provider(fake, Clock(), on_fetch=results.append, **kw)
        try:
            assert await p.servers() == ()
            assert results == ["error"]
        finally:
            await p.close()
    assert [r["auth"] for r in fake.requests][0] == "Bearer wrong"


def test_build_provider_from_settings(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    base = {"node": {"state_dir": tmp_path / "s", "secrets_dir": secrets}}
    s = load_settings(None, **base)
    assert isinstance(build_ice_provider(s), StaticIce)
    (secrets / "turn_key_id").write_text("abc123\n")
    with pytest.raises(ConfigError, match="both secrets"):
        build_ice_provider(s)
    (secrets / "turn_api_token").write_text("tok\n")
    assert isinstance(build_ice_provider(s), CloudflareTurn)
    s = load_settings(None, **base, webrtc={"ice_servers": ["turn:turn.example:3478"]})
    with pytest.raises(ConfigError, match="turn_credential"):
        build_ice_provider(s)
    s = load_settings(None, **base, webrtc={"ice_servers": ["https://x"]})
    with pytest.raises(ConfigError, match="not STUN/TURN"):
        build_ice_provider(s)


def test_for_aiortc_drops_what_aiortc_cannot_parse() -> None:
    servers = (
        IceServer(urls=("stuns:a.example:5349", "stun:a.example:3478")),
        IceServer(urls=("turn:[::1]:3478",), username="u", credential="c"),
    )
    out = for_aiortc(servers)
    assert [s.urls for s in out] == [["stun:a.example:3478"]]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> HlsClip:
    return make_hls(tmp_path_factory.mktemp("clip") / "c", seconds=2, bframes=0)


async def test_whep_hands_minted_servers_to_viewer_and_uses_them(
    tmp_path: Path, fake: FakeCloudflareTurn, clip: HlsClip
) -> None:
    secrets = with_key(tmp_path)
    (secrets / "turn_key_id").write_text(fake.key_id)
    (secrets / "turn_api_token").write_text(fake.api_token)
    settings = load_settings(
        None,
        node={"state_dir": tmp_path / "state", "secrets_dir": secrets},
        http={"port": 0},
        webrtc={"turn_api_url": fake.base_url, "connect_timeout_s": 5},
    )
    async with start_node(settings, {"c": clip}) as n:
        mid = n.media["c"]
        sdp = await make_offer()
        auth = bearer(mid)
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.post(f"{n.url}/whep/{mid}", data=sdp, headers=SDP) as r:
                assert r.status == 201
                links = r.headers.getall("Link")
                answer = await r.text()
                location = r.headers["Location"]
            username = fake.requests[-1]["username"]
            assert len(links) == 4
            assert links[0] == f'<stun:127.0.0.1:{fake.stun_port}>; rel="ice-server"'
            assert all(f'username="{username}"' in v for v in links[1:])
            assert all('credential-type="password"' in v for v in links[1:])
            # The node's own peer connection used them: a server-reflexive candidate from the
            # STUN URL, and an allocation attempt on the TURN URL.
            assert re.search(r"a=candidate:.* typ srflx", answer)
            assert fake.stun.bindings >= 1
            assert fake.stun.allocations >= 1
            # The player page embeds the same minted list; a second session reuses it.
            async with http.get(f"{n.url}/whep/player/{mid}") as r:
                page = await r.text()
            blob = re.search(r'<script id="config" type="application/json">(.*?)</script>', page)
            assert blob is not None
            assert json.loads(blob.group(1))["iceServers"][1]["username"] == username
            assert len(fake.requests) == 1
            async with http.delete(n.url + location) as r:
                assert r.status == 200
        metrics = n.rt.metrics.render().decode()
        assert 'peerd_turn_credentials_fetch_total{result="ok"} 1.0' in metrics
