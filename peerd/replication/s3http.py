"""Signed S3 requests for one bucket over one aiohttp session: every call the R2 client makes.

One :class:`aiohttp.ClientSession` keeps a pool of keep-alive connections (bounded by
``max_concurrency``), with a connect timeout and a read timeout between any two arrivals of
bytes. Requests are signed by botocore (``S3SigV4Auth`` on an ``AWSRequest``): the caller states
the payload hash -- for a blob, the digest inside its cid, so signing costs no hashing -- and
botocore's own code does the rest. boto3 is not used: its client costs a thread hop and a few
milliseconds of CPU per request, and its ``Expect: 100-continue`` on PUT bodies a round trip.

R2's rules kept: no ACL or tagging headers; blob PUTs carry ``If-None-Match: *`` and an
explicit SHA-256 (``x-amz-checksum-sha256``, base64; the signed ``x-amz-content-sha256`` is the
same digest in hex). The file is hashed while it is sent (in the reading thread) and the last
slice is held back until the hash matched: a local file that no longer matches its cid never
becomes a complete PUT.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl
from botocore.auth import EMPTY_SHA256_HASH, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SEND_CHUNK = 1024 * 1024
ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
EMPTY_SHA256 = EMPTY_SHA256_HASH

Query = tuple[tuple[str, str], ...]


class HttpStatusError(Exception):
    """A non-success answer: ``status`` and S3's error ``code`` (from the XML body, if any).

    Internal to the R2 client, hence not under ``PeerdError``: :mod:`peerd.replication.r2` turns
    it into an :class:`~peerd.replication.r2.R2Error` before anything else sees it."""

    def __init__(self, status: int, code: str, op: str, key: str) -> None:
        super().__init__(f"R2 {op} {key} failed: {status} {code}".strip())
        self.status = status
        self.code = code


class LocalMismatch(Exception):
    """The local file did not hash to what the request promised; the upload was cut short.

    Internal to the R2 client like :class:`HttpStatusError` (it becomes an ``R2Error``)."""


def sse_headers(key: bytes | None) -> dict[str, str]:
    """SSE-C headers for a 32-byte customer key (none without a key)."""
    if key is None:
        return {}
    return {
        "x-amz-server-side-encryption-customer-algorithm": "AES256",
        "x-amz-server-side-encryption-customer-key": base64.b64encode(key).decode(),
        "x-amz-server-side-encryption-customer-key-md5": base64.b64encode(
            hashlib.md5(key).digest()  # noqa: S324 -- the protocol's key fingerprint, not security
        ).decode(),
    }


def _read_hashed(path: Path, offset: int, n: int, h: Any) -> bytes:
    # Opened per chunk, not across the generator's yields: aiohttp may stop iterating a body
    # (the server answered early, the connection broke) and never close the generator, which
    # would leave an open file to the garbage collector.
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(n)
    h.update(data)
    return data


async def file_body(
    path: Path, offset: int, size: int, digest: bytes, chunk: int = SEND_CHUNK
) -> AsyncIterator[bytes]:
    """``size`` bytes of ``path`` from ``offset``, read (and hashed) in threads.

    The final slice is yielded only once the SHA-256 of all bytes equals ``digest``; otherwise
    :class:`LocalMismatch` is raised and the request body stays incomplete.
    """
    h = hashlib.sha256()
    pos = offset
    left = size
    while left:
        data = await asyncio.to_thread(_read_hashed, path, pos, min(chunk, left), h)
        if not data:
            raise LocalMismatch(f"{path} is shorter than {offset + size} bytes")
        pos += len(data)
        left -= len(data)
        if not left and h.digest() != digest:
            raise LocalMismatch(f"{path} does not match the digest it is uploaded under")
        yield data


class _StatedPayload(S3SigV4Auth):  # type: ignore[misc]  # botocore ships no types
    """botocore's S3 signer, with the payload hash taken from the request's context instead of
    hashing the body: bodies stream from files, and their digest is known beforehand."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


class S3Http:
    """Signed S3 requests for one bucket over one aiohttp session."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key_id: str,
        secret_access_key: str,
        region: str,
        max_concurrency: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        sse_c_key: bytes | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.host = self.endpoint.split("://", 1)[1].split("/", 1)[0]
        self.bucket = bucket
        self._credentials = Credentials(access_key_id, secret_access_key)
        self._region = region
        self._auth = _StatedPayload(self._credentials, "s3", region)
        self._sse = sse_headers(sse_c_key)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_concurrency * 2, limit_per_host=max_concurrency * 2
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
            ),
            auto_decompress=False,
        )

    async def close(self) -> None:
        """Close the pool."""
        await self._session.close()

    def url(self, key: str, query: Query = ()) -> str:
        """The request URL of ``key`` (path-style; the bucket itself for ``""``), encoded as it
        is signed and sent."""
        url = self.endpoint + quote(
            f"/{self.bucket}/{key}" if key else f"/{self.bucket}", safe="/-_.~"
        )
        if query:
            url += "?" + "&".join(
                f"{k}={v}"
                for k, v in sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
            )
        return url

    def sign(
        self, method: str, url: str, headers: dict[str, str], payload_sha256: str
    ) -> dict[str, str]:
        """``headers`` plus ``X-Amz-Date``, ``X-Amz-Content-SHA256`` and ``Authorization``,
        signed now by botocore for ``method`` on ``url`` (which must be sent exactly so)."""
        req = AWSRequest(method=method, url=url, headers=headers)
        req.context["payload_sha256"] = payload_sha256
        self._auth.add_auth(req)
        return dict(req.headers.items())

    def presign(self, key: str, expires_s: int, query: Query = ()) -> str:
        """A GET URL of ``key`` anyone may use for ``expires_s`` seconds (SigV4 query auth,
        signed by botocore; ``query``: e.g. ``response-content-type``). No I/O."""
        req = AWSRequest(method="GET", url=self.url(key, query), headers={"host": self.host})
        S3SigV4QueryAuth(self._credentials, "s3", self._region, expires=expires_s).add_auth(req)
        return str(req.url)

    async def request(
        self,
        op: str,
        method: str,
        key: str,
        *,
        query: Query = (),
        headers: dict[str, str] | None = None,
        payload_sha256: str = EMPTY_SHA256,
        data: Any = None,
        sse: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send one signed request; the caller reads and releases the response.

        Error statuses (>= 300, except 404 on HEAD/GET which callers test) raise
        :class:`HttpStatusError` with S3's error code.
        """
        url = self.url(key, query)
        hdrs = {
            "host": self.host,
            # Bytes exactly as stored: a compressed answer would not hash to the cid.
            "accept-encoding": "identity",
            **(self._sse if sse else {}),
            **(headers or {}),
        }
        resp = await self._session.request(
            method,
            # Sent exactly as signed: yarl must not re-encode (a '+' in an upload id, say).
            yarl.URL(url, encoded=True),
            headers=self.sign(method, url, hdrs, payload_sha256),
            data=data,
            allow_redirects=False,
        )
        if resp.status >= 300 and not (resp.status == 404 and method in ("GET", "HEAD")):
            code = ""
            try:
                if method != "HEAD":
                    m = ERROR_CODE.search(await resp.content.read(4096))
                    code = m.group(1).decode("utf-8", "replace") if m else ""
            finally:
                resp.release()
            raise HttpStatusError(resp.status, code, op, key)
        return resp
