"""ICE servers for WHEP sessions: static from the configuration, or minted by Cloudflare TURN.

Cloudflare TURN hands out short-lived credentials: ``POST
<turn_api_url>/turn/keys/<key id>/credentials/generate-ice-servers`` with ``Authorization: Bearer
<api token>`` and ``{"ttl": seconds}`` answers 201 with ``{"iceServers": [...]}``. The list is
passed through as given (to the viewer in ``Link`` headers and the player page, and to the node's
own peer connection), cached until ``turn_refresh_margin_s`` before it expires, and refreshed by
one request however many sessions start at once. When a refresh fails, unexpired credentials are
still used; past expiry, sessions get the static servers only (direct connections keep working,
relayed ones fail) and the failure is logged and counted. After a failure the API is not asked
again for ``RETRY_S`` seconds, so an outage does not turn every viewer into a request.

The key id and token are the secrets ``turn_key_id`` and ``turn_api_token``; the static list is
``webrtc.ice_servers`` (URLs) with ``webrtc.turn_username`` and the secret ``turn_credential`` for
static TURN URLs. Nothing here reaches a STUN server by default: with no configuration the list
is empty, and the node's peer connection gets an empty list too (aiortc would otherwise fall back
to a public STUN server).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp
from aiortc import RTCIceServer
from aiortc.rtcicetransport import parse_stun_turn_uri

from peerd.config import Settings
from peerd.core.whep import IceServer, credentials_fresh, parse_ice_servers
from peerd.errors import ConfigError, UpstreamError

log = logging.getLogger("peerd.webrtc")

RETRY_S = 30.0


class IceProvider(Protocol):
    """Where a session's ICE servers come from."""

    async def servers(self) -> tuple[IceServer, ...]:
        """The list to give the viewer and the node's own peer connection."""

    async def close(self) -> None:
        """Release connections."""


class StaticIce:
    """A fixed list from the configuration."""

    def __init__(self, servers: Sequence[IceServer]) -> None:
        self._servers = tuple(servers)

    async def servers(self) -> tuple[IceServer, ...]:
        """The configured list."""
        return self._servers

    async def close(self) -> None:
        """Nothing to release."""


class CloudflareTurn:
    """Credentials minted by Cloudflare TURN's generate-ice-servers API, cached until near expiry.

    ``static`` servers (from the configuration) are appended after the minted ones and used alone
    when minting fails and nothing unexpired is cached.
    """

    def __init__(
        self,
        *,
        api_url: str,
        key_id: str,
        api_token: str,
        ttl_s: int,
        refresh_margin_s: float,
        timeout_s: float = 5.0,
        static: Sequence[IceServer] = (),
        clock: Callable[[], float] = time.time,
        on_fetch: Callable[[str], None] | None = None,
    ) -> None:
        if not key_id.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("secret turn_key_id is not a Cloudflare TURN key id")
        self._url = f"{api_url.rstrip('/')}/turn/keys/{key_id}/credentials/generate-ice-servers"
        self._token = api_token
        self._ttl = ttl_s
        self._margin = min(refresh_margin_s, ttl_s / 2)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._static = tuple(static)
        self._clock = clock
        self._on_fetch = on_fetch
        self._cached: tuple[IceServer, ...] = ()
        self._expires_at = 0.0
        self._retry_at = 0.0
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def servers(self) -> tuple[IceServer, ...]:
        """Minted servers (refreshed when near expiry) followed by the static ones."""
        now = self._clock()
        if not credentials_fresh(now, self._expires_at, self._margin) and now >= self._retry_at:
            # One refresh for every caller that finds the cache stale at the same time.
            if self._inflight is None or self._inflight.done():
                self._inflight = asyncio.create_task(self._refresh())
            await asyncio.shield(self._inflight)
        if self._clock() < self._expires_at:
            return self._cached + self._static
        return self._static

    async def _refresh(self) -> None:
        started = self._clock()
        try:
            minted = await self._fetch()
        except UpstreamError as exc:
            log.warning(
                "cannot mint TURN credentials",
                extra={"error": exc.message, "cached_valid": self._clock() < self._expires_at},
            )
            self._retry_at = self._clock() + RETRY_S
            if self._on_fetch is not None:
                self._on_fetch("error")
            return
        self._cached = minted
        self._expires_at = started + self._ttl
        if self._on_fetch is not None:
            self._on_fetch("ok")
        log.info("minted TURN credentials", extra={"ttl_s": self._ttl, "servers": len(minted)})

    async def _fetch(self) -> tuple[IceServer, ...]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            async with self._session.post(
                self._url, json={"ttl": self._ttl}, headers=headers
            ) as resp:
                if resp.status != 201:
                    text = (await resp.text())[:200]
                    raise UpstreamError(
                        f"Cloudflare TURN answered {resp.status} (expected 201): {text}"
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamError(f"Cloudflare TURN request failed: {exc!r}") from exc
        if not isinstance(body, dict) or "iceServers" not in body:
            raise UpstreamError("Cloudflare TURN answer has no iceServers")
        return parse_ice_servers(body["iceServers"])

    async def close(self) -> None:
        """Cancel a refresh in flight and close the HTTP session."""
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


def static_servers(settings: Settings) -> tuple[IceServer, ...]:
    """``webrtc.ice_servers`` as a list: STUN URLs alone, TURN URLs with the static credential."""
    cfg = settings.webrtc
    stun = [u for u in cfg.ice_servers if u.startswith("stun")]
    turn = [u for u in cfg.ice_servers if u.startswith("turn")]
    other = [u for u in cfg.ice_servers if not u.startswith(("stun", "turn"))]
    if other:
        raise ConfigError(f"webrtc.ice_servers: not STUN/TURN URLs: {other}")
    out: list[IceServer] = []
    if stun:
        out.append(IceServer(urls=tuple(stun)))
    if turn:
        credential = settings.secret("turn_credential")
        if cfg.turn_username is None or credential is None:
            raise ConfigError(
                "webrtc.ice_servers lists TURN URLs: set webrtc.turn_username and the secret "
                "turn_credential"
            )
        out.append(IceServer(urls=tuple(turn), username=cfg.turn_username, credential=credential))
    try:
        return parse_ice_servers([s.to_json() for s in out], where="webrtc.ice_servers")
    except UpstreamError as exc:
        raise ConfigError(exc.message) from None


def build_ice_provider(
    settings: Settings, on_fetch: Callable[[str], None] | None = None
) -> IceProvider:
    """Cloudflare TURN when both of its secrets are present, else the static list."""
    static = static_servers(settings)
    key_id = settings.secret("turn_key_id")
    token = settings.secret("turn_api_token")
    if (key_id is None) != (token is None):
        raise ConfigError("Cloudflare TURN needs both secrets turn_key_id and turn_api_token")
    if key_id is None or token is None:
        return StaticIce(static)
    cfg = settings.webrtc
    return CloudflareTurn(
        api_url=cfg.turn_api_url,
        key_id=key_id,
        api_token=token,
        ttl_s=cfg.turn_ttl_s,
        refresh_margin_s=cfg.turn_refresh_margin_s,
        timeout_s=cfg.turn_timeout_s,
        static=static,
        on_fetch=on_fetch,
    )


def for_aiortc(servers: Sequence[IceServer]) -> list[RTCIceServer]:
    """The subset aiortc can use: it takes one STUN and one TURN URL, udp/tcp/turns-over-tcp.

    aiortc skips what it cannot use but raises on a URL it cannot parse (e.g. an IPv6 literal),
    so such URLs are left out here; the viewer still receives the whole list.
    """
    out: list[RTCIceServer] = []
    for s in servers:
        usable: list[str] = []
        for url in s.urls:
            try:
                parsed = parse_stun_turn_uri(url)
            except ValueError:
                continue
            if parsed["scheme"] == "stuns":
                continue  # aioice has no STUN over TLS
            usable.append(url)
        if usable:
            out.append(RTCIceServer(urls=usable, username=s.username, credential=s.credential))
    return out
