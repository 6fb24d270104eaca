"""A front for ``moto_server`` that answers presigned URLs as R2 does.

moto 5 accepts a presigned GET of an existing object without checking its signature or its
expiry; R2 refuses both (403 ``AccessDenied``, "Request has expired" or a signature mismatch).
This proxy sits between every client and moto: a request carrying ``X-Amz-Signature`` in its
query is checked first -- ``X-Amz-Date`` + ``X-Amz-Expires`` must not have passed, and the
signature must be the one botocore computes for the URL with the test credentials -- then every
request goes to moto unchanged (method, path, query, headers, body), and moto's answer comes
back as is. CORS is moto's own (it implements PutBucketCors, preflights and
``Access-Control-Allow-Origin`` on GET; start moto with ``MOTO_DISABLE_GLOBAL_CORS=1``, or
moto_server allows every origin on every bucket, which R2 does not), so the front adds none.
"""

from __future__ import annotations

import datetime
import hmac
from urllib.parse import parse_qsl

import aiohttp
import yarl
from aiohttp import web
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.s3server import ACCESS_KEY, SECRET_KEY

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
_DENIED = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    "<Message>{}</Message></Error>"
)


def presign_problem(method: str, host: str, path: str, raw_query: str) -> str | None:
    """Why a presigned request would be refused by R2 (None: it is good)."""
    params = dict(parse_qsl(raw_query, keep_blank_values=True))
    try:
        signed_at = datetime.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.UTC
        )
        expires = int(params["X-Amz-Expires"])
        region = params["X-Amz-Credential"].split("/")[2]
    except (KeyError, ValueError, IndexError):
        return "Invalid presigned URL"
    if datetime.datetime.now(datetime.UTC) > signed_at + datetime.timedelta(seconds=expires):
        return "Request has expired"
    unsigned = "&".join(p for p in raw_query.split("&") if not p.startswith("X-Amz-Signature="))
    req = AWSRequest(method=method, url=f"http://{host}{path}?{unsigned}", headers={"host": host})
    auth = S3SigV4QueryAuth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", region, expires=expires)
    req.context["timestamp"] = params["X-Amz-Date"]
    want = auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req)
    if not hmac.compare_digest(want, params.get("X-Amz-Signature", "")):
        return "The request signature we calculated does not match the signature you provided"
    return None


class BucketFront:
    """The proxy: ``url`` is the S3 endpoint clients (peerd included) use."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")
        self.host = host  # where it listens (e.g. a veth address a daemon in a netns reaches)
        self.url = ""
        self.refused: list[str] = []  # why each presigned request was refused
        self.presigned_ok = 0  # presigned requests passed to moto
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> BucketFront:
        """Listen on a free loopback port."""
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 0).start()
        self.url = f"http://{self.host}:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        """Stop listening and close the upstream connections."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_query = request.rel_url.raw_query_string
        if "X-Amz-Signature=" in raw_query:
            path = request.raw_path.split("?", 1)[0]
            problem = presign_problem(request.method, request.host, path, raw_query)
            if problem is not None:
                self.refused.append(problem)
                return web.Response(
                    status=403, text=_DENIED.format(problem), content_type="application/xml"
                )
            self.presigned_ok += 1
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        async with self._session.request(
            request.method,
            yarl.URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            data = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if request.method != "HEAD":
                return web.Response(status=up.status, body=data, headers=out)
            resp = web.StreamResponse(status=up.status, headers=out)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            await resp.write_eof()
            return resp
