"""The R2 hot path over aiohttp: blob PUT, HEAD and part uploads, and request signing.

boto3 costs a thread hop and a few milliseconds of CPU per request, and its ``Expect:
100-continue`` on PUT bodies adds a round trip; on the paths that move every blob that dominated
push time and cold-miss latency. Here one :class:`aiohttp.ClientSession` keeps a pool of
keep-alive connections (bounded by ``max_concurrency``), requests are signed with the pure
signer in :mod:`peerd.core.sigv4`, and bodies stream from the blob file in threads. Object
GETs go over :mod:`peerd.replication.s3get` (signed here, by :meth:`S3Http.signed_get`).

R2's rules kept: no ACL or tagging headers; blob PUTs carry ``If-None-Match: *`` and an
explicit SHA-256 (``x-amz-checksum-sha256``, base64; the signed ``x-amz-content-sha256`` is the
same digest in hex -- both taken from the cid, no hashing needed). The file is hashed while it
is sent (in the reading thread) and the last slice is held back until the hash matched: a local
file that no longer matches its cid never becomes a complete PUT.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yarl

from peerd.core.sigv4 import EMPTY_SHA256, SigningKey, canonical_query, sign, uri_encode

SEND_CHUNK = 1024 * 1024
ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


class HttpStatusError(Exception):
    """A non-success answer: ``status`` and S3's error ``code`` (from the XML body, if any)."""

    def __init__(self, status: int, code: str, op: str, key: str) -> None:
        super().__init__(f"R2 {op} {key} failed: {status} {code}".strip())
        self.status = status
        self.code = code


class LocalMismatch(Exception):
    """The local file did not hash to what the request promised; the upload was cut short."""


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


class S3Http:
    """Signed S3 requests for one bucket over one aiohttp session."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        key: SigningKey,
        *,
        max_concurrency: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        sse_c_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.host = self.endpoint.split("://", 1)[1].split("/", 1)[0]
        self.bucket = bucket
        self.key = key
        self._sse = sse_headers(sse_c_key)
        self._clock = clock
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

    def _url(self, key: str, query: tuple[tuple[str, str], ...]) -> tuple[str, yarl.URL]:
        path = f"/{self.bucket}/{key}"
        url = self.endpoint + uri_encode(path, keep_slash=True)
        if query:
            url += "?" + canonical_query(query)
        # Sent exactly as signed: yarl must not re-encode (a '+' in an upload id, say).
        return path, yarl.URL(url, encoded=True)

    def signed(
        self,
        method: str,
        path: str,
        query: tuple[tuple[str, str], ...] = (),
        headers: dict[str, str] | None = None,
        payload_sha256: str = EMPTY_SHA256,
        sse: bool = True,
    ) -> dict[str, str]:
        """The headers of a request for ``path`` (``/<bucket>/<key>``), signed now."""
        hdrs = {
            "host": self.host,
            # Bytes exactly as stored: a compressed answer would not hash to the cid.
            "accept-encoding": "identity",
            **(self._sse if sse else {}),
            **(headers or {}),
        }
        return sign(self.key, method, path, query, hdrs, payload_sha256, self._clock())

    def signed_get(self, key: str) -> tuple[str, dict[str, str]]:
        """Request target (encoded path) and signed headers of a GET of ``key``."""
        path = f"/{self.bucket}/{key}"
        return uri_encode(path, keep_slash=True), self.signed("GET", path)

    async def request(
        self,
        op: str,
        method: str,
        key: str,
        *,
        query: tuple[tuple[str, str], ...] = (),
        headers: dict[str, str] | None = None,
        payload_sha256: str = EMPTY_SHA256,
        data: Any = None,
        sse: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send one signed request; the caller reads and releases the response.

        Error statuses (>= 300, except 404 on HEAD/GET which callers test) raise
        :class:`HttpStatusError` with S3's error code.
        """
        path, url = self._url(key, query)
        signed = self.signed(method, path, query, headers, payload_sha256, sse)
        resp = await self._session.request(
            method,
            url,
            headers=signed,
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
