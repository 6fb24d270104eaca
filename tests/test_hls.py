"""HLS delivery over HTTP: ffmpeg plays every test media end to end; headers, Range, CORS,
signed URLs (every bad token refused alike), Access mode, the stream cap, metrics, misses."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hls_node import KEY, Node, run_node
from multidict import CIMultiDict

from peerd.core import tokens
from peerd.core.ids import Cid, cid_of
from peerd.delivery.resolver import Resolver
from peerd.delivery.source import Offer
from peerd.http.clientip import client_ip, parse_networks
from tests.support.cf_access import FakeAccessTeam
from tests.support.hlsmedia import make_hls
from tests.support.poll import until
from tests.support.sources import MemorySource


@pytest.fixture(scope="session")
def playlists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny fMP4 and one MPEG-TS rendition (6 s, 320x240, A/V), made once per session."""
    root = tmp_path_factory.mktemp("hlsmedia")
    return {c: make_hls(root / c, c) for c in ("fmp4", "ts")}


@pytest.fixture(params=[True, False], ids=["fast_path", "aiohttp_only"])
async def node(
    request: pytest.FixtureRequest, tmp_path: Path, playlists: dict[str, Path]
) -> AsyncIterator[Node]:
    """A node serving HLS with ``[http] fast_path`` on and off: every test runs both ways."""
    async with run_node(tmp_path, playlists, http={"fast_path": request.param}) as n:
        assert (n.fast is not None) == request.param
        yield n


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _get(
    http: aiohttp.ClientSession, url: str, **kw: object
) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.get(url, allow_redirects=False, **kw) as r:  # type: ignore[arg-type]
        return r.status, r.headers.copy(), await r.read()


async def _sample(node: Node, name: str, **labels: str) -> float | None:
    """A metric sample; the server counts a blob after its last byte left, which can be a moment
    after the client has read it, so wait (bounded) for it to appear."""
    registry = node.rt.metrics.registry
    await until(lambda: registry.get_sample_value(name, labels) is not None)
    return registry.get_sample_value(name, labels)


async def _ffmpeg_decode(url: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-v", "error", "-i", url, "-map", "0", "-f", "null", "-",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, err.decode()


@pytest.mark.parametrize("container", ["fmp4", "ts"])
async def test_ffmpeg_plays_master_end_to_end(node: Node, container: str) -> None:
    code, err = await _ffmpeg_decode(node.url(container))
    assert code == 0, err
    assert err.strip() == "", err
    # Every segment went out once through the blob route and was counted as local bytes.
    served = await _sample(node, "peerd_bytes_served_total", source="local")
    assert served is not None
    assert served > 100_000


async def test_playlists_carry_signed_relative_urls(
    node: Node, http: aiohttp.ClientSession
) -> None:
    url = node.url("fmp4")
    token = url.split("token=")[1]
    status, headers, body = await _get(http, url)
    assert status == 200
    assert headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert headers["Cache-Control"] == "max-age=2"
    assert headers["Access-Control-Allow-Origin"] == "*"
    text = body.decode()
    assert f"v0.m3u8?token={token}" in text
    status, headers, body = await _get(http, node.url("fmp4", "v0.m3u8", token))
    assert status == 200
    media = body.decode()
    assert re.search(rf'#EXT-X-MAP:URI="b/b[a-z2-7]{{58}}\.mp4\?token={re.escape(token)}"', media)
    segs = re.findall(rf"^b/(b[a-z2-7]{{58}})\.m4s\?token={re.escape(token)}$", media, re.M)
    assert len(segs) == 3
    status, _, body = await _get(http, node.url("ts", "v0.m3u8"))
    assert status == 200
    assert len(re.findall(r"^b/b[a-z2-7]{58}\.ts\?token=", body.decode(), re.M)) == 3


async def _first_blob(node: Node, http: aiohttp.ClientSession, container: str) -> str:
    _, _, body = await _get(http, node.url(container, "v0.m3u8"))
    return re.findall(r"^(b/b[a-z2-7]{58}\.(?:m4s|ts))", body.decode(), re.M)[0]


@pytest.mark.parametrize(
    ("container", "ext", "ctype"),
    [("fmp4", "m4s", "video/iso.segment"), ("ts", "ts", "video/mp2t")],
)
async def test_blob_headers_range_head_etag(
    node: Node, http: aiohttp.ClientSession, container: str, ext: str, ctype: str
) -> None:
    path = await _first_blob(node, http, container)
    url = node.url(container, path)
    status, h, body = await _get(http, url)
    assert status == 200
    assert h["Content-Type"] == ctype
    assert h["Cache-Control"] == "public, max-age=31536000, immutable"
    assert h["Access-Control-Allow-Origin"] == "*"
    assert h["Accept-Ranges"] == "bytes"
    assert int(h["Content-Length"]) == len(body)
    cid = path[2:].split(".")[0]
    assert cid_of(body) == cid
    status, h2, part = await _get(http, url, headers={"Range": "bytes=10-19"})
    assert status == 206
    assert part == body[10:20]
    assert h2["Content-Range"] == f"bytes 10-19/{len(body)}"
    status, h3, _ = await _get(http, url, headers={"Range": f"bytes={len(body) + 5}-"})
    assert status == 416
    assert h3["Content-Range"] == f"bytes */{len(body)}"
    async with http.head(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == ctype
        assert int(r.headers["Content-Length"]) == len(body)
        assert await r.read() == b""
    status, _, body304 = await _get(http, url, headers={"If-None-Match": h["ETag"]})
    assert status == 304
    assert body304 == b""


async def test_init_segment_content_type(node: Node, http: aiohttp.ClientSession) -> None:
    _, _, body = await _get(http, node.url("fmp4", "v0.m3u8"))
    init = re.search(r'URI="(b/[^"?]+)', body.decode())
    assert init is not None
    status, h, data = await _get(http, node.url("fmp4", init.group(1)))
    assert status == 200
    assert h["Content-Type"] == "video/mp4"
    assert data[4:8] == b"ftyp"


async def test_cors_preflight_for_range(node: Node, http: aiohttp.ClientSession) -> None:
    path = await _first_blob(node, http, "fmp4")
    async with http.options(
        node.url("fmp4", path),
        headers={
            "Origin": "http://player.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "range",
        },
    ) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Range" in r.headers["Access-Control-Allow-Headers"]
        assert "GET" in r.headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "garbage",
        "tampered",
        "expired",
        "other-media",
        "wrong-scope",
        "other-key",
        "extended-expiry",
    ],
)
async def test_every_bad_token_is_refused_alike(
    node: Node, http: aiohttp.ClientSession, case: str
) -> None:
    mid = node.media["fmp4"]
    now = int(time.time())
    good = tokens.mint(KEY, mid, "hls", now + 600)
    bad = {
        "missing": None,
        "empty": "",
        "garbage": "v1.hls.x.y",
        "tampered": good[:-1] + ("A" if good[-1] != "A" else "B"),
        "expired": tokens.mint(KEY, mid, "hls", now - 1),
        "other-media": tokens.mint(KEY, node.media["ts"], "hls", now + 600),
        "wrong-scope": tokens.mint(KEY, mid, "whep", now + 600),
        "other-key": tokens.mint(b"x" * 32, mid, "hls", now + 600),
        "extended-expiry": good.replace(f".{now + 600}.", f".{now + 9999}."),
    }[case]
    blob = await _first_blob(node, http, "fmp4")
    for path in ("master.m3u8", "v0.m3u8", blob):
        q = "" if bad is None else f"?token={bad}"
        status, h, body = await _get(http, f"{node.base}/hls/{mid}/{path}{q}")
        assert status == 403, (case, path)
        assert body == b'{"error": "forbidden", "message": "forbidden"}'
        assert h["Access-Control-Allow-Origin"] == "*"
    denied = node.rt.metrics.registry.get_sample_value(
        "peerd_http_denied_total",
        {
            "reason": {"missing": "missing", "empty": "missing", "garbage": "malformed"}.get(
                case, {"expired": "expired", "wrong-scope": "scope"}.get(case, "signature")
            )
        },
    )
    assert denied == 3


async def test_unknown_media_blob_and_extension(node: Node, http: aiohttp.ClientSession) -> None:
    mid_ts = node.media["ts"]
    fmp4_blob = await _first_blob(node, http, "fmp4")
    # A blob of another media, with a valid token for this media: not served.
    status, _, _ = await _get(http, node.url("ts", fmp4_blob))
    assert status == 404
    ts_blob = await _first_blob(node, http, "ts")
    status, _, _ = await _get(http, node.url("ts", ts_blob.replace(".ts", ".m4s")))
    assert status == 404
    status, _, _ = await _get(http, node.url("ts", "nope.m3u8"))
    assert status == 404
    absent = "b" + "a" * 58
    tok = tokens.mint(KEY, absent, "hls", int(time.time()) + 60)
    status, _, _ = await _get(http, f"{node.base}/hls/{absent}/master.m3u8?token={tok}")
    assert status == 404
    assert mid_ts


async def test_stream_cap_answers_429(node: Node, http: aiohttp.ClientSession) -> None:
    blob = await _first_blob(node, http, "ts")
    node.routes.streams = node.routes.max_streams
    status, h, _ = await _get(http, node.url("ts", blob))
    assert status == 429
    assert h["Retry-After"] == "1"
    node.routes.streams = 0
    status, _, _ = await _get(http, node.url("ts", blob))
    assert status == 200


async def test_metrics_expose_requests_latency_bytes_streams(
    node: Node, http: aiohttp.ClientSession
) -> None:
    blob = await _first_blob(node, http, "ts")
    await _get(http, node.url("ts", blob))
    assert await _sample(node, "peerd_http_blob_bytes_total", source="local", status="200")
    status, _, body = await _get(http, f"{node.base}/metrics")
    assert status == 200
    text = body.decode()
    assert 'peerd_http_requests_total{route="/hls/{media}/b/{cid}.{ext}",status="200"}' in text
    assert "peerd_http_request_seconds_bucket" in text
    assert 'peerd_http_blob_bytes_total{source="local",status="200"}' in text
    assert "peerd_http_active_streams 0.0" in text


async def test_missing_blob_is_fetched_through_the_resolver(
    node: Node, http: aiohttp.ClientSession
) -> None:
    blob = await _first_blob(node, http, "ts")
    cid = Cid(blob[2:].split(".")[0])
    data = await node.rt.store.read(cid)
    await node.rt.store.delete(cid)
    status, _, _ = await _get(http, node.url("ts", blob))
    assert status == 404  # no resolver: the node cannot get it
    source = MemorySource(name="lan", blobs={cid: data})
    node.routes.resolver = Resolver(node.rt.store, [source], registry=None)
    status, _, body = await _get(http, node.url("ts", blob))
    assert status == 200
    assert body == data
    assert source.requests == [cid]
    # The bytes are credited to the source that delivered them (the "P2P savings" figure).
    fetched = await _sample(node, "peerd_http_blob_bytes_total", source="lan", status="200")
    assert fetched == len(data)
    assert await _sample(node, "peerd_bytes_served_total", source="lan") == len(data)
    # Now held: the next request is served from the local store.
    reg, labels = node.rt.metrics.registry, {"source": "local", "status": "200"}
    before = reg.get_sample_value("peerd_http_blob_bytes_total", labels) or 0.0
    status, _, _ = await _get(http, node.url("ts", blob))
    assert status == 200
    # Counted once the last byte left: wait (bounded) for it.
    await until(
        lambda: reg.get_sample_value("peerd_http_blob_bytes_total", labels) == before + len(data)
    )
    assert reg.get_sample_value("peerd_http_blob_bytes_total", {**labels, "source": "lan"}) == len(
        data
    )


class _GatedTrusted(MemorySource):
    """A trusted source (as the node's R2 is) that sends the first chunk, then waits for
    ``gate`` before the rest."""

    def __init__(self, blobs: dict[Cid, bytes], lies: dict[Cid, bytes] | None = None) -> None:
        super().__init__(name="r2", blobs=blobs, lies=lies or {}, chunk=4096)
        self.gate = asyncio.Event()

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        async for offer in super().offers(cid):
            offer.meta["trusted"] = "1"
            yield Offer(offer.source, offer.peer, self._gated(offer.chunks), offer.size, offer.meta)

    async def _gated(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        first = True
        async for chunk in chunks:
            yield chunk
            if first:
                first = False
                await self.gate.wait()


async def test_a_miss_from_the_bucket_is_relayed_while_stored(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """The viewer gets the first bytes before the node has the whole blob (no store-first
    wait); a blob that turns out wrong is cut short of Content-Length and not kept."""
    blob = await _first_blob(node, http, "ts")
    cid = Cid(blob[2:].split(".")[0])
    data = await node.rt.store.read(cid)
    await node.rt.store.delete(cid)
    source = _GatedTrusted({cid: data})
    node.routes.resolver = Resolver(node.rt.store, [source], registry=None)
    async with http.get(node.url("ts", blob)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "video/mp2t"
        assert resp.content_length == len(data)
        first = await asyncio.wait_for(resp.content.readany(), 10)
        assert first  # arrived while the source is still held at its first chunk
        assert not await node.rt.store.has(cid)
        source.gate.set()
        rest = await resp.read()
    assert first + rest == data
    assert await node.rt.store.read(cid) == data
    assert await _sample(node, "peerd_http_blob_bytes_total", source="r2", status="200") == len(
        data
    )

    # A wrong blob from the trusted source: the body never completes and nothing is kept.
    await node.rt.store.delete(cid)
    liar = _GatedTrusted({}, lies={cid: bytes(len(data))})
    liar.gate.set()
    node.routes.resolver = Resolver(node.rt.store, [liar], registry=None)
    async with http.get(node.url("ts", blob)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert not await node.rt.store.has(cid)


def test_client_ip_trusts_cf_header_only_from_proxies() -> None:
    from aiohttp.test_utils import make_mocked_request

    trusted = parse_networks(["127.0.0.0/8", "::1/128"])
    req = make_mocked_request("GET", "/", headers={"CF-Connecting-IP": "203.0.113.7"})
    # make_mocked_request has no peer; check both branches through the transport peername.
    req._transport_peername = ("127.0.0.1", 5000)  # type: ignore[attr-defined]
    assert client_ip(req, trusted) == "203.0.113.7"
    req2 = make_mocked_request("GET", "/", headers={"CF-Connecting-IP": "203.0.113.7"})
    req2._transport_peername = ("198.51.100.2", 5000)  # type: ignore[attr-defined]
    assert client_ip(req2, trusted) == "198.51.100.2"
    req3 = make_mocked_request("GET", "/", headers={"CF-Connecting-IP": "not-an-ip"})
    req3._transport_peername = ("127.0.0.1", 5000)  # type: ignore[attr-defined]
    assert client_ip(req3, trusted) == "127.0.0.1"


async def test_access_mode(tmp_path: Path, playlists: dict[str, Path]) -> None:
    team = FakeAccessTeam()
    await team.start()
    try:
        cfg = {"auth": "access", "access_team_url": team.base_url, "access_aud": team.audience}
        async with (
            run_node(tmp_path, {"ts": playlists["ts"]}, http=cfg) as n,
            aiohttp.ClientSession() as http,
        ):
            url = n.url("ts", token=None)
            status, _, _ = await _get(http, url)
            assert status == 403
            bad = team.token(aud=["other"])
            status, _, _ = await _get(http, url, headers={"Cf-Access-Jwt-Assertion": bad})
            assert status == 403
            good = {"Cf-Access-Jwt-Assertion": team.token()}
            status, _, body = await _get(http, url, headers=good)
            assert status == 200
            assert "token=" not in body.decode()
            status, h, _ = await _get(http, n.url("ts", "v0.m3u8", token=None), headers=good)
            assert status == 200
            blob = re.findall(
                r"^b/\S+",
                (await _get(http, n.url("ts", "v0.m3u8", token=None), headers=good))[2].decode(),
                re.M,
            )[0]
            status, h, _ = await _get(http, n.url("ts", blob, token=None), headers=good)
            assert status == 200
            assert h["Cache-Control"].startswith("private")
    finally:
        await team.stop()
