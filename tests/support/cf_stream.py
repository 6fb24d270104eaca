"""A local fake of Cloudflare Stream's live-input API, with an RTMPS front for a real receiver.

The API is the real shape (``https://api.cloudflare.com/client/v4`` is ``base_url`` here):

``POST /accounts/<account>/stream/live_inputs``  ``Authorization: Bearer <token>``, a JSON body
    (``meta``, ``recording``, ``deleteRecordingAfterDays``); answers 200 with Cloudflare's
    envelope ``{"success": true, "errors": [], "messages": [], "result": {...}}``, the result
    carrying ``uid``, ``rtmps {url, streamKey}``, ``rtmpsPlayback``, ``srt``, ``webRTC {url}``,
    ``webRTCPlayback {url}``, ``recording``, ``created``/``modified``, ``status``;
``GET .../live_inputs``  ``{"liveInputs": [{uid, meta, created, modified, ...}], "range", "total"}``
    (no credentials in the list);
``GET`` / ``DELETE .../live_inputs/<uid>``  the same result (DELETE: none); 404 for an unknown uid;
``GET <customer domain>/<uid>/views``  ``{"liveViewers": n}`` (:attr:`live_viewers`).

A missing token answers 401 and a wrong one (or another account) 403, in the same envelope with
``success: false`` and ``errors: [{"code": 10000, "message": "Authentication error"}]``. The
customer domain (WebRTC and playback URLs) is this server too.

``rtmps.url`` points at :class:`RtmpsFront`, a TLS listener that forwards each connection to a
plain RTMP receiver (the ffmpeg CLI: ``ffmpeg -listen 1 -i rtmp://127.0.0.1:P/live/<key>``), as
ffmpeg cannot listen for RTMPS itself ("rtmp_listen not available for rtmps"). The front's
certificate is self-signed, made per test (:func:`make_cert`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

AUTH_ERROR = {"code": 10000, "message": "Authentication error"}


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files in ``directory``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "front.crt", directory / "front.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class RtmpsFront:
    """TLS on 127.0.0.1:``port``, each connection piped to 127.0.0.1:``upstream_port`` (plain
    RTMP); a connection the upstream refuses is closed at once (a dead receiver)."""

    cert: Path
    key: Path
    upstream_port: int
    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RtmpsFront:
        """Listen on an ephemeral port."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return
            try:
                await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
            finally:
                up_w.close()
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


@dataclass
class FakeCloudflareStream:
    """The fake API on loopback; ``base_url`` goes in ``[live.handoff] api_url``."""

    rtmps_base: str  # e.g. rtmps://127.0.0.1:<front port>/live/
    account_id: str = field(default_factory=lambda: secrets.token_hex(16))
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    requests: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    live_viewers: int = 0
    base_url: str = ""
    customer: str = ""  # the fake customer domain (scheme://host:port)
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeCloudflareStream:
        """Bind the API to an ephemeral loopback port."""
        app = web.Application()
        prefix = "/client/v4/accounts/{account}/stream/live_inputs"
        app.router.add_post(prefix, self._create)
        app.router.add_get(prefix, self._list)
        app.router.add_get(prefix + "/{uid}", self._get)
        app.router.add_delete(prefix + "/{uid}", self._delete)
        app.router.add_get("/{uid}/views", self._views)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.customer = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.customer}/client/v4"
        return self

    async def close(self) -> None:
        """Stop the API."""
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _envelope(result: Any, status: int = 200, errors: list[Any] | None = None) -> web.Response:
        body = {"success": not errors, "errors": errors or [], "messages": [], "result": result}
        return web.json_response(body, status=status)

    async def _authorized(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization")
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "authorization": auth,
            "body": await request.json() if request.can_read_body else None,
        }
        self.requests.append(record)
        if not auth:
            return self._envelope(None, 401, [AUTH_ERROR])
        if auth != f"Bearer {self.api_token}" or request.match_info["account"] != self.account_id:
            return self._envelope(None, 403, [AUTH_ERROR])
        return None

    async def _create(self, request: web.Request) -> web.Response:
        refused = await self._authorized(request)
        if refused is not None:
            return refused
        body = self.requests[-1]["body"] or {}
        uid = secrets.token_hex(16)
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        key = secrets.token_hex(16) + "k" + secrets.token_hex(15)
        self.inputs[uid] = {
            "uid": uid,
            "created": now,
            "modified": now,
            "meta": body.get("meta", {}),
            "enabled": True,
            "deleteRecordingAfterDays": body.get("deleteRecordingAfterDays"),
            "recording": {
                "mode": "off",
                "requireSignedURLs": False,
                "allowedOrigins": None,
                "timeoutSeconds": 0,
                **body.get("recording", {}),
            },
            "rtmps": {"url": self.rtmps_base, "streamKey": key},
            "rtmpsPlayback": {"url": self.rtmps_base, "streamKey": secrets.token_hex(16)},
            "srt": {
                "url": "srt://127.0.0.1:778",
                "streamId": uid,
                "passphrase": secrets.token_hex(16),
            },
            "srtPlayback": {
                "url": "srt://127.0.0.1:778",
                "streamId": "play" + uid,
                "passphrase": secrets.token_hex(16),
            },
            "webRTC": {"url": f"{self.customer}/{key}/webRTC/publish"},
            "webRTCPlayback": {"url": f"{self.customer}/{uid}/webRTC/play"},
            "status": None,
        }
        return self._envelope(self.inputs[uid])

    async def _list(self, request: web.Request) -> web.Response:
        refused = await self._authorized(request)
        if refused is not None:
            return refused
        # Listed without credentials: those come only with one live input's GET.
        keep = ("uid", "meta", "created", "modified", "deleteRecordingAfterDays")
        listed = [{k: i[k] for k in keep} for i in self.inputs.values()]
        return self._envelope({"liveInputs": listed, "range": 1000, "total": len(listed)})

    async def _get(self, request: web.Request) -> web.Response:
        refused = await self._authorized(request)
        if refused is not None:
            return refused
        found = self.inputs.get(request.match_info["uid"])
        if found is None:
            return self._envelope(None, 404, [{"code": 10003, "message": "Not Found"}])
        return self._envelope(found)

    async def _delete(self, request: web.Request) -> web.Response:
        refused = await self._authorized(request)
        if refused is not None:
            return refused
        if self.inputs.pop(request.match_info["uid"], None) is None:
            return self._envelope(None, 404, [{"code": 10003, "message": "Not Found"}])
        return self._envelope(None)

    async def _views(self, request: web.Request) -> web.Response:
        if request.match_info["uid"] not in self.inputs:
            return web.json_response({"liveViewers": 0}, status=404)
        return web.json_response({"liveViewers": self.live_viewers})
