"""A fake coordinator built to the contract in ``peerd.coordinator`` and ``peerd/api/openapi.json``.

It is what the real coordinator (a Cloudflare Worker, not in this repo) must do, on loopback:

* accepts ``POST /v1/nodes/{register,heartbeat,drain}`` only with a valid ed25519 signature by the
  key embedded in ``X-Peerd-Peer-Id``, a fresh timestamp and an unused nonce (401 otherwise); the
  body must fit the ``NodeReport`` schema of the committed OpenAPI document (400 otherwise); a
  heartbeat or drain from a node that never registered gets 404 (register first);
* can be taken "down" (answers 503) to exercise the node's backoff, or made to forget a node;
* talks to a node's ``/api/v1/`` through :class:`NodeApiClient`, which validates every response
  against the OpenAPI document, and checks possession-challenge answers with
  :meth:`FakeCoordinator.verify_challenge`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import ClientSession, web

from peerd.core.signed import PEER_HEADER, SIGNATURE_HEADER
from peerd.identity import verify_signature
from tests.support.openapi import OpenApiDocument, SchemaViolation
from tests.support.signed import (
    ReplayWindow,
    SignatureError,
    SignedBody,
    Verdict,
    check_signature,
    verify_body,
)


@dataclass
class Refusal:
    """A report the fake refused, and why."""

    path: str
    status: int
    reason: str


@dataclass
class FakeCoordinator:
    """The coordinator's node-facing endpoints, verifying signatures and refusing replays."""

    window_s: float = 60.0
    clock: Callable[[], float] = time.time
    heartbeat_interval_s: float | None = None
    down: bool = False
    reports: list[SignedBody] = field(default_factory=list)
    raw: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""
    host: str = "127.0.0.1"
    _runner: web.AppRunner | None = None
    _replay: ReplayWindow | None = None
    _doc: OpenApiDocument = field(default_factory=OpenApiDocument)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> str:
        """Listen on :attr:`host` (loopback unless set; ephemeral port); returns the base URL."""
        self._replay = ReplayWindow(self.window_s)
        app = web.Application()
        app.router.add_post("/v1/nodes/{kind}", self._report)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = cast("asyncio.Server | None", site._server)
        assert server is not None
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    def forget(self, peer_id: str) -> None:
        """Lose a node's registration (as after a coordinator restart)."""
        self.nodes.pop(peer_id, None)

    def of_kind(self, kind: str) -> list[SignedBody]:
        """Accepted reports of one kind, oldest first."""
        return [r for r in self.reports if r.payload["kind"] == kind]

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 20.0) -> None:
        """Wait until ``predicate()`` holds (checked on every report)."""
        async with asyncio.timeout(within_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def _refuse(self, path: str, status: int, reason: str) -> web.Response:
        self.refused.append(Refusal(path, status, reason))
        self._changed.set()
        return web.json_response({"error": "refused", "message": reason}, status=status)

    async def _report(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        body = await request.read()
        if self.down:
            return self._refuse(request.path, 503, "coordinator down")
        if kind not in ("register", "heartbeat", "drain"):
            return self._refuse(request.path, 404, "no such endpoint")
        try:
            signed = verify_body(
                body,
                request.headers.get(PEER_HEADER),
                request.headers.get(SIGNATURE_HEADER),
                verify_signature,
            )
        except SignatureError as exc:
            return self._refuse(request.path, 401, str(exc))
        assert self._replay is not None
        verdict = self._replay.check(signed.peer_id, signed.timestamp, signed.nonce, self.clock())
        if not verdict.ok:
            return self._refuse(request.path, 401, verdict.reason)
        try:
            self._doc.validate_component("NodeReport", signed.payload)
        except SchemaViolation as exc:
            return self._refuse(request.path, 400, str(exc))
        if signed.payload["kind"] != kind:
            return self._refuse(request.path, 400, "body kind differs from the endpoint")
        if kind != "register" and signed.peer_id not in self.nodes:
            return self._refuse(request.path, 404, "unknown node; register first")
        self.nodes[signed.peer_id] = signed.payload
        self.reports.append(signed)
        self.raw.append((body, dict(request.headers)))
        self._changed.set()
        reply: dict[str, Any] = {"accepted": True}
        if self.heartbeat_interval_s is not None:
            reply["heartbeat_interval_s"] = self.heartbeat_interval_s
        return web.json_response(reply)

    # -- talking to the node ---------------------------------------------------------------------

    @staticmethod
    def new_challenge(cid: str, offset: int, length: int) -> dict[str, Any]:
        """A challenge with a fresh 16-byte nonce."""
        return {"nonce": secrets.token_hex(16), "cid": cid, "offset": offset, "length": length}

    def verify_challenge(
        self,
        peer_id: str,
        challenge: dict[str, Any],
        body: bytes,
        headers: dict[str, str],
        expected_bytes: bytes,
    ) -> Verdict:
        """Check a node's answer: signed by ``peer_id``'s key, about this challenge, and
        ``sha256(nonce || expected_bytes)`` (the coordinator knows the bytes from R2)."""
        if headers.get(PEER_HEADER) != peer_id:
            return Verdict(False, "answer signed by another peer id")
        try:
            check_signature(
                body, headers.get(PEER_HEADER), headers.get(SIGNATURE_HEADER), verify_signature
            )
        except SignatureError as exc:
            return Verdict(False, str(exc))
        answer = json.loads(body)
        for key in ("nonce", "cid", "offset", "length"):
            if answer.get(key) != challenge[key]:
                return Verdict(False, f"answer is about another challenge ({key})")
        want = hashlib.sha256(bytes.fromhex(challenge["nonce"]) + expected_bytes).hexdigest()
        if answer.get("sha256") != want:
            return Verdict(False, "wrong hash: the node does not hold these bytes")
        return Verdict(True)


@dataclass
class ApiAnswer:
    """A validated response of the node API."""

    status: int
    body: Any
    raw: bytes
    headers: dict[str, str]


class NodeApiClient:
    """Calls a node's ``/api/v1/`` and validates every response against the OpenAPI document."""

    def __init__(self, base_url: str, token: str | None, doc: OpenApiDocument | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.doc = doc or OpenApiDocument()
        self.session = ClientSession()
        self.calls = 0

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.session.close()

    async def call(
        self,
        method: str,
        template: str,
        *,
        path: str | None = None,
        body: Any = None,
        params: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> ApiAnswer:
        """One request; raises :class:`SchemaViolation` if the answer breaks the document."""
        headers = {}
        tok = token if token is not None else self.token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        url = self.base_url + (path or template)
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, url, data=data, params=params, headers=headers
        ) as r:
            raw = await r.read()
            status = r.status
            ctype = r.content_type
            resp_headers = dict(r.headers)
        self.calls += 1
        if ctype != "application/json":
            raise SchemaViolation(f"{method} {template} {status}: content type {ctype}")
        parsed = json.loads(raw)
        self.doc.validate_response(method, template, status, parsed)
        return ApiAnswer(status, parsed, raw, resp_headers)

    async def command(self, kind: str, body: dict[str, Any]) -> ApiAnswer:
        """POST a command."""
        return await self.call("POST", f"/api/v1/commands/{kind}", body=body)

    async def job(self, job_id: str) -> ApiAnswer:
        """GET a job."""
        return await self.call("GET", "/api/v1/jobs/{job_id}", path=f"/api/v1/jobs/{job_id}")

    async def wait_job(self, job_id: str, within_s: float = 20.0) -> dict[str, Any]:
        """Poll a job until it is done or failed; its final status."""
        async with asyncio.timeout(within_s):
            while True:
                ans = await self.job(job_id)
                if ans.body["state"] in ("done", "failed"):
                    return dict(ans.body)
                await asyncio.sleep(0.05)
