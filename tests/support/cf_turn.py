"""A local fake of Cloudflare TURN's credential API, with a loopback STUN responder.

The API is the real shape: ``POST /v1/turn/keys/<key id>/credentials/generate-ice-servers``,
``Authorization: Bearer <api token>``, JSON body ``{"ttl": seconds}``; it answers ``201`` with
``{"iceServers": [{"urls": [stun...]}, {"urls": [turn...], "username": ..., "credential": ...}]}``
(fresh username and credential per call), ``401`` for a wrong token, ``404`` for an unknown key
and ``400`` for a bad body, as Cloudflare does.

Instead of ``stun.cloudflare.com`` and ``turn.cloudflare.com`` the URLs point at a UDP responder
on 127.0.0.1 so nothing leaves the machine: it answers STUN Binding requests (so a WebRTC stack
gathers its server-reflexive candidate at once) and refuses TURN Allocate with 403 (relaying is
not faked; a refused allocation is skipped by ICE, as an unreachable relay would be).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aioice import stun


class _StunResponder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.bindings = 0
        self.allocations = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            msg = stun.parse_message(data)
        except ValueError:
            return
        if msg.message_class != stun.Class.REQUEST or self.transport is None:
            return
        if msg.message_method == stun.Method.BINDING:
            self.bindings += 1
            out = stun.Message(
                message_method=stun.Method.BINDING,
                message_class=stun.Class.RESPONSE,
                transaction_id=msg.transaction_id,
            )
            out.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        else:
            self.allocations += 1
            out = stun.Message(
                message_method=msg.message_method,
                message_class=stun.Class.ERROR,
                transaction_id=msg.transaction_id,
            )
            out.attributes["ERROR-CODE"] = (403, "Forbidden")
        out.add_fingerprint()
        self.transport.sendto(bytes(out), addr)


@dataclass
class FakeCloudflareTurn:
    """The fake API (and STUN responder) on loopback; ``base_url`` goes in ``turn_api_url``."""

    key_id: str = field(default_factory=lambda: secrets.token_hex(16))
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0
    base_url: str = ""
    stun_port: int = 0
    _runner: web.AppRunner | None = None
    _udp: asyncio.DatagramTransport | None = None
    _stun: _StunResponder | None = None

    @property
    def stun(self) -> _StunResponder:
        """The UDP responder (counts of bindings and refused allocations)."""
        assert self._stun is not None
        return self._stun

    async def start(self) -> FakeCloudflareTurn:
        """Bind the HTTP API and the UDP responder to ephemeral loopback ports."""
        loop = asyncio.get_running_loop()
        udp, proto = await loop.create_datagram_endpoint(
            _StunResponder, local_addr=("127.0.0.1", 0)
        )
        self._udp, self._stun = udp, proto
        self.stun_port = int(udp.get_extra_info("sockname")[1])
        app = web.Application()
        app.router.add_post(
            "/v1/turn/keys/{key_id}/credentials/generate-ice-servers", self._generate
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def close(self) -> None:
        """Stop both listeners."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._udp is not None:
            self._udp.close()

    def ice_servers(self, username: str, credential: str) -> list[dict[str, Any]]:
        """The list Cloudflare would mint, with loopback hosts."""
        host = f"127.0.0.1:{self.stun_port}"
        return [
            {"urls": [f"stun:{host}"]},
            {
                "urls": [
                    f"turn:{host}?transport=udp",
                    f"turn:{host}?transport=tcp",
                    f"turns:{host}?transport=tcp",
                ],
                "username": username,
                "credential": credential,
            },
        ]

    async def _generate(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        record: dict[str, Any] = {"key_id": request.match_info["key_id"], "auth": auth}
        self.requests.append(record)
        if request.match_info["key_id"] != self.key_id:
            return web.json_response({"error": "key not found"}, status=404)
        if auth != f"Bearer {self.api_token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        ttl = body.get("ttl") if isinstance(body, dict) else None
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            return web.json_response({"error": "ttl must be a positive integer"}, status=400)
        record["ttl"] = ttl
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"error": "internal"}, status=500)
        username = secrets.token_hex(32)
        credential = secrets.token_hex(32)
        record["username"] = username
        return web.json_response({"iceServers": self.ice_servers(username, credential)}, status=201)
