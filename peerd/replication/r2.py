"""The R2 client: every request signed by botocore and sent over one aiohttp session
(:mod:`peerd.replication.s3http`), configured for R2's rules.

Key layout in the bucket::

    blobs/<cid>            one blob, immutable; written once with ``If-None-Match: *`` and an
                           explicit SHA-256 checksum (single PUT) or SHA-256 part checksums
                           (multipart, equal parts >= 5 MiB, see :mod:`peerd.core.multipart`)
    media/<media id>.json  a media item's canonical manifest (its bytes hash to the media id)

R2 specifics: region ``auto``; no ACL or tagging headers are ever sent; the SHA-256 checksum
is sent explicitly -- for a blob it is the digest inside its cid, so it costs no hashing for
single PUTs. Writes are not retried here: the outbox retries them with its own backoff and
records every error. Reads (:meth:`R2Client.open`) retry a transient failure (a 5xx or 429
answer, a connection reset before the answer) with a short backoff, and resume a body cut
midway with a ``Range`` request; a blob R2 lacks costs exactly one GET (a 404), and every byte
is checked against its cid by whoever stores it.

Multipart uploads left open (a process killed mid-upload, an abort that failed, a
``CreateMultipartUpload`` whose answer was lost) are billed storage until aborted. Before a
multipart upload of a key -- the outbox lease makes this process its only uploader here -- and
after one fails, :meth:`R2Client.abort_uploads` aborts every other open upload of that key; the
replicator sweeps ``blobs/`` at start (:data:`STALE_UPLOAD_S`). A bucket lifecycle rule
(``AbortIncompleteMultipartUpload``) is the second guard (README).

An upload is *verified* when a HEAD (with ``x-amz-checksum-mode: ENABLED``) reports the expected
size and checksum: the blob's digest for a single PUT, or the composite checksum of the parts
(recomputed from the local file with the part size recorded in the object's metadata).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import logging
import re
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape, unescape

import aiohttp

from peerd.core.ids import Cid, digest_of
from peerd.core.multipart import b64_digest, check_plan, composite_checksum, plan_parts
from peerd.errors import ConfigError, UpstreamError
from peerd.replication.s3http import (
    EMPTY_SHA256,
    ERROR_CODE,
    HttpStatusError,
    LocalMismatch,
    Query,
    S3Http,
    file_body,
    sse_headers,
)
from peerd.store import hash_file

log = logging.getLogger("peerd.replication")

CHUNK = 256 * 1024
PART_SIZE_META = "peerd-part-size"
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.1
UPLOAD_ID = re.compile(r"<UploadId>([^<]{1,1024})</UploadId>")
UPLOAD = re.compile(r"<Upload>(.*?)</Upload>", re.S)
CONTENTS = re.compile(r"<Contents>(.*?)</Contents>", re.S)
# An open multipart upload older than this was abandoned: uploading the largest blob over a slow
# uplink takes hours, not a day.
STALE_UPLOAD_S = 24 * 3600.0
# CopyObject copies at most 5 GiB in one request (S3 and R2); larger objects go by parts.
COPY_LIMIT = 5 * 1024**3


class R2Error(UpstreamError):
    """A request to R2 failed. ``throttled``: the server asked us to slow down; ``transient``:
    the same request may well succeed in a moment (a 5xx, a reset connection)."""

    def __init__(
        self, message: str, *, throttled: bool = False, transient: bool = False, **detail: Any
    ) -> None:
        super().__init__(message, **detail)
        self.throttled = throttled
        self.transient = transient or throttled


class AlreadyExists(R2Error):
    """``If-None-Match: *`` failed: the key already holds an object."""


@dataclass(frozen=True)
class R2Config:
    """What the client needs (built from ``R2Settings`` and the secrets)."""

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str = "auto"
    max_concurrency: int = 8
    part_size: int = 16 * 1024 * 1024
    multipart_threshold: int = 64 * 1024 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    sse_c_key: bytes | None = None


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD says about an object."""

    size: int
    checksum_sha256: str | None
    part_size: int | None
    etag: str | None = None


@dataclass(frozen=True)
class ListedObject:
    """One object of a listing: its ``key``, ``size`` and ``etag`` (quotes stripped)."""

    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class OpenUpload:
    """A multipart upload not completed nor aborted: its ``key``, id and start (Unix time)."""

    key: str
    upload_id: str
    initiated: float


def blob_key(cid: str) -> str:
    """The bucket key of a blob."""
    return f"blobs/{cid}"


def manifest_key(media_id: str) -> str:
    """The bucket key of a media item's manifest."""
    return f"media/{media_id}.json"


def config_from_settings(settings: Any) -> R2Config | None:
    """An :class:`R2Config` from :class:`peerd.config.Settings`, or None when R2 is not set up."""
    r2 = settings.r2
    if not r2.configured:
        return None
    key_id = settings.secret("r2_access_key_id")
    secret = settings.secret("r2_secret_access_key")
    if not key_id or not secret:
        log.warning("R2 bucket configured but credentials are missing; R2 is off")
        return None
    sse: bytes | None = None
    if r2.sse_c:
        raw = settings.secret("r2_sse_c_key")
        if not raw:
            raise ConfigError("r2.sse_c is on but the secret r2_sse_c_key is missing")
        try:
            sse = base64.b64decode(raw, validate=True)
        except ValueError:
            sse = None
        if sse is None or len(sse) != 32:
            raise ConfigError("r2_sse_c_key must be 32 bytes, base64-encoded")
    return R2Config(
        endpoint=r2.endpoint_url,
        bucket=r2.bucket,
        access_key_id=key_id,
        secret_access_key=secret,
        region=r2.region,
        max_concurrency=r2.max_concurrency,
        part_size=r2.part_size_bytes,
        multipart_threshold=max(r2.multipart_threshold_bytes, r2.part_size_bytes),
        connect_timeout_s=r2.connect_timeout_s,
        read_timeout_s=r2.read_timeout_s,
        sse_c_key=sse,
    )


def _http_error(op: str, key: str, exc: BaseException) -> R2Error:
    """An :class:`R2Error` for a failed request (its status and S3 code, or what broke)."""
    if isinstance(exc, HttpStatusError):
        throttled = exc.code in ("SlowDown", "TooManyRequests", "ServiceUnavailable") or (
            exc.status in (429, 503)
        )
        cls = AlreadyExists if exc.status == 412 else R2Error
        return cls(
            str(exc), throttled=throttled, transient=exc.status >= 500, status_code=exc.status
        )
    if isinstance(exc, LocalMismatch):
        return R2Error(f"R2 {op} {key} refused: {exc}")
    # A timeout is not transient here: the caller's own deadline is about as long.
    transient = isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, TimeoutError)
    return R2Error(f"R2 {op} {key} failed: {type(exc).__name__}: {exc}", transient=transient)


_HTTP_ERRORS = (HttpStatusError, LocalMismatch, aiohttp.ClientError, TimeoutError, OSError)


class R2Client:
    """Async client for one bucket: blobs and manifests, over one aiohttp session. Build it
    inside the running loop."""

    def __init__(self, cfg: R2Config, *, on_request: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self._on_request = on_request
        self.http = S3Http(
            cfg.endpoint,
            cfg.bucket,
            access_key_id=cfg.access_key_id,
            secret_access_key=cfg.secret_access_key,
            region=cfg.region,
            max_concurrency=cfg.max_concurrency,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            sse_c_key=cfg.sse_c_key,
        )
        # Multipart uploads in progress in this process: never swept.
        self._live: set[str] = set()

    async def close(self) -> None:
        """Close the connections."""
        await self.http.close()

    def _count(self, op: str) -> None:
        if self._on_request is not None:
            self._on_request(op)

    async def _send(
        self, op: str, method: str, key: str, *, read: bool = False, **kw: Any
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """One request (``kw`` as :meth:`S3Http.request` takes them), counted; its (released)
        answer and, with ``read``, its body."""
        self._count(op)
        try:
            resp = await self.http.request(op, method, key, **kw)
            try:
                body = await resp.read() if read else b""
            finally:
                resp.release()
        except _HTTP_ERRORS as exc:
            raise _http_error(op, key, exc) from exc
        return resp, body

    # -- reads ------------------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        """Size and checksum of an object; None if it does not exist."""
        resp, _ = await self._send(
            "HeadObject", "HEAD", key, headers={"x-amz-checksum-mode": "ENABLED"}
        )
        if resp.status == 404:
            return None
        h = resp.headers
        part = h.get("x-amz-meta-" + PART_SIZE_META, "")
        length = h.get("Content-Length", "")
        if not length.isdigit():
            raise R2Error(f"R2 HEAD {key} answered without a Content-Length")
        return ObjectInfo(
            size=int(length),
            checksum_sha256=h.get("x-amz-checksum-sha256"),
            part_size=int(part) if part.isdigit() else None,
            etag=h.get("ETag", "").strip('"') or None,
        )

    async def open(self, key: str) -> tuple[int, GetBody] | None:
        """Start a GET: (size, body chunks), or None if the object does not exist.

        A transient failure before the body (see :class:`R2Error`) is retried up to
        :data:`READ_ATTEMPTS` times in all, with backoff. The first chunk is whatever arrived
        first (a viewer's first byte waits for nothing more); later ones are gathered to about
        :data:`CHUNK` bytes. A body cut midway is resumed from where it stopped (a ``Range`` GET,
        within the same attempts); one that cannot be raises :class:`R2Error`. Closing the
        iterator (or finishing it) releases the connection.
        """
        attempt = 1
        while True:
            try:
                resp = await self._get(key)
            except R2Error as exc:
                if not exc.transient or attempt >= READ_ATTEMPTS:
                    raise
                await _backoff(attempt)
                attempt += 1
                continue
            if resp is None:
                return None
            size = resp.content_length
            if size is None:
                resp.close()
                raise R2Error(f"R2 GET {key} answered without a Content-Length")
            return size, GetBody(self, resp, key, size, attempt)

    async def _get(self, key: str, start: int = 0) -> aiohttp.ClientResponse | None:
        """A GET's answer, its body unread (None for a 404); from ``start`` with a Range."""
        self._count("GetObject")
        headers = {"range": f"bytes={start}-"} if start else None
        try:
            resp = await self.http.request("GetObject", "GET", key, headers=headers)
        except _HTTP_ERRORS as exc:
            raise _http_error("GET", key, exc) from exc
        if resp.status == 404:
            resp.release()  # the error body is small: read whole, the connection is kept
            return None
        return resp

    async def get_bytes(self, key: str, limit: int = 64 * 1024 * 1024) -> bytes | None:
        """A whole (small) object, or None if it does not exist."""
        got = await self.open(key)
        if got is None:
            return None
        size, chunks = got
        if size > limit:
            await chunks.aclose()
            raise R2Error(f"R2 object {key} is larger than {limit} bytes")
        return b"".join([c async for c in chunks])

    # -- writes -----------------------------------------------------------------------------------

    async def _put(
        self,
        op: str,
        key: str,
        body: Any,
        digest: bytes,
        size: int,
        content_type: str,
        *,
        query: Query = (),
        conditional: bool = True,
    ) -> aiohttp.ClientResponse:
        """One signed PUT with an explicit SHA-256; returns the (released) response."""
        headers = {
            "Content-Length": str(size),
            "x-amz-checksum-sha256": b64_digest(digest),
            # Names the algorithm of the checksum header (what SDKs send; some servers need it).
            "x-amz-sdk-checksum-algorithm": "SHA256",
        }
        if content_type:
            headers["Content-Type"] = content_type
        if conditional:
            headers["If-None-Match"] = "*"
        resp, _ = await self._send(
            op,
            "PUT",
            key,
            query=query,
            headers=headers,
            payload_sha256=digest.hex() if size else EMPTY_SHA256,
            data=body,
        )
        return resp

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str, conditional: bool = True
    ) -> None:
        """Create ``key`` with ``data`` (If-None-Match: *). :class:`AlreadyExists` if present.

        ``conditional=False`` replaces whatever the key holds."""
        digest = hashlib.sha256(data).digest()
        await self._put(
            "PutObject", key, data, digest, len(data), content_type, conditional=conditional
        )

    def put_requests(self, size: int) -> int:
        """The class A requests :meth:`put_blob` makes for ``size`` bytes when nothing fails:
        one PUT, or list (leftovers), create, the parts and complete."""
        if size < self.cfg.multipart_threshold:
            return 1
        return len(plan_parts(size, self.cfg.part_size)) + 3

    async def put_blob(self, cid: Cid, path: Path, size: int) -> None:
        """Upload a blob file; single PUT below the multipart threshold, else multipart.

        The body streams from the file and is hashed as it goes; a file that does not match
        ``cid`` never completes its PUT.
        """
        key = blob_key(cid)
        if size < self.cfg.multipart_threshold:
            digest = digest_of(cid)
            body = file_body(path, 0, size, digest)
            await self._put("PutObject", key, body, digest, size, "application/octet-stream")
            return
        await self._put_multipart(key, path, size)

    async def _put_multipart(self, key: str, path: Path, size: int) -> None:
        await self._abort_leftovers(key)
        try:
            await self._multipart(key, path, size)
        except Exception:
            # Also the upload a lost CreateMultipartUpload answer left behind.
            await self._abort_leftovers(key)
            raise

    async def _abort_leftovers(self, key: str) -> None:
        """Abort the open uploads of ``key`` not in progress here (best effort)."""
        try:
            await self.abort_uploads(u for u in await self.list_uploads(key) if u.key == key)
        except R2Error as exc:
            log.info("cannot list open uploads", extra={"key": key, "error": exc.message})

    async def _multipart(self, key: str, path: Path, size: int) -> None:
        parts = plan_parts(size, self.cfg.part_size)
        check_plan(parts, size)
        part_size = parts[0].size
        _, created = await self._send(
            "CreateMultipartUpload",
            "POST",
            key,
            query=(("uploads", ""),),
            headers={
                "Content-Type": "application/octet-stream",
                "x-amz-checksum-algorithm": "SHA256",
                "x-amz-meta-" + PART_SIZE_META: str(part_size),
            },
            read=True,
        )
        m = UPLOAD_ID.search(created.decode("utf-8", "replace"))
        if m is None:
            raise R2Error(f"R2 CreateMultipartUpload {key} answered without an UploadId")
        upload_id = unescape(m.group(1))
        self._live.add(upload_id)

        async def upload(number: int, offset: int, n: int) -> str:
            # Hash the part first (its checksum goes in the signed headers), then stream it;
            # the streaming pass checks the bytes again, so a file changing in between is caught.
            digest = await asyncio.to_thread(hash_file, path, offset, n)
            if digest is None:
                raise R2Error(f"local file {path} shrank while uploading")
            resp = await self._put(
                "UploadPart",
                key,
                file_body(path, offset, n, digest),
                digest,
                n,
                "",
                query=(("partNumber", str(number)), ("uploadId", upload_id)),
                conditional=False,
            )
            etag = resp.headers.get("ETag")
            if not etag:
                raise R2Error(f"R2 UploadPart {key} #{number} answered without an ETag")
            return (
                f"<Part><PartNumber>{number}</PartNumber><ETag>{escape(etag)}</ETag>"
                f"<ChecksumSHA256>{b64_digest(digest)}</ChecksumSHA256></Part>"
            )

        try:
            sem = asyncio.Semaphore(self.cfg.max_concurrency)

            async def bounded(number: int, offset: int, n: int) -> str:
                async with sem:
                    return await upload(number, offset, n)

            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(bounded(p.number, p.offset, p.size)) for p in parts]
            except BaseExceptionGroup as eg:
                first = eg.exceptions[0]
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            doc = (
                '<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                + "".join(t.result() for t in tasks)
                + "</CompleteMultipartUpload>"
            ).encode()
            resp, answer = await self._send(
                "CompleteMultipartUpload",
                "POST",
                key,
                query=(("uploadId", upload_id),),
                headers={"Content-Type": "application/xml", "If-None-Match": "*"},
                payload_sha256=hashlib.sha256(doc).hexdigest(),
                data=doc,
                read=True,
            )
            # S3 may answer 200 and report the failure in the body (it sends the head early).
            code = ERROR_CODE.search(answer)
            if code is not None:
                err = HttpStatusError(resp.status, code.group(1).decode("utf-8", "replace"), "", "")
                raise _http_error("CompleteMultipartUpload", key, err)
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise
        finally:
            self._live.discard(upload_id)

    async def _abort(self, key: str, upload_id: str) -> bool:
        """Abort one upload (best effort: False, logged, if R2 did not confirm)."""
        try:
            await self._send(
                "AbortMultipartUpload",
                "DELETE",
                key,
                query=(("uploadId", upload_id),),
                sse=False,
            )
        except R2Error as exc:
            if exc.detail.get("status_code") == 404:
                return True  # gone already (NoSuchUpload)
            log.info("abort of multipart upload failed", extra={"key": key, "error": str(exc)})
            return False
        return True

    async def list_uploads(self, prefix: str) -> list[OpenUpload]:
        """The open multipart uploads under ``prefix`` (every page)."""
        out: list[OpenUpload] = []
        markers: Query = ()
        while True:
            query: Query = (("prefix", prefix), ("uploads", ""), *markers)
            resp, body = await self._send(
                "ListMultipartUploads", "GET", "", query=query, read=True, sse=False
            )
            text = body.decode("utf-8", "replace")
            if resp.status == 404:
                raise R2Error(f"R2 ListMultipartUploads {prefix} failed: 404", status_code=404)
            for block in UPLOAD.findall(text):
                key, upload_id = _xml_text(block, "Key"), _xml_text(block, "UploadId")
                if key and upload_id:
                    out.append(OpenUpload(key, upload_id, _xml_time(_xml_text(block, "Initiated"))))
            next_key = _xml_text(text, "NextKeyMarker")
            if _xml_text(text, "IsTruncated") != "true" or not next_key:
                return out
            markers = (
                ("key-marker", next_key),
                ("upload-id-marker", _xml_text(text, "NextUploadIdMarker")),
            )

    async def abort_uploads(self, uploads: Iterable[OpenUpload]) -> int:
        """Abort ``uploads`` (from :meth:`list_uploads`), except those in progress in this
        process; returns how many were aborted. A failed abort is logged and left for the next
        sweep."""
        aborted = 0
        for u in uploads:
            if u.upload_id not in self._live and await self._abort(u.key, u.upload_id):
                aborted += 1
        if aborted:
            log.info("aborted abandoned multipart uploads", extra={"uploads": aborted})
        return aborted

    def blob_url(self, cid: Cid, *, expires_s: int, content_type: str) -> str | None:
        """A presigned GET URL of the blob for a viewer (valid ``expires_s``, answered with
        ``content_type``); None with SSE-C, whose key a viewer must never hold. No request."""
        if self.cfg.sse_c_key is not None:
            return None
        return self.http.presign(
            blob_key(cid), expires_s, (("response-content-type", content_type),)
        )

    async def put_cors(self, origins: list[str], max_age_s: int = 3600) -> None:
        """Set the bucket's CORS rule (PutBucketCors): GET/HEAD from ``origins`` with the
        headers players send, so a player follows the node's redirects to the bucket."""
        rule = "".join(f"<AllowedOrigin>{escape(o)}</AllowedOrigin>" for o in origins)
        body = (
            '<CORSConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><CORSRule>'
            f"{rule}<AllowedMethod>GET</AllowedMethod><AllowedMethod>HEAD</AllowedMethod>"
            "<AllowedHeader>*</AllowedHeader>"
            "<ExposeHeader>Content-Length</ExposeHeader><ExposeHeader>Content-Range</ExposeHeader>"
            "<ExposeHeader>ETag</ExposeHeader>"
            f"<MaxAgeSeconds>{max_age_s}</MaxAgeSeconds></CORSRule></CORSConfiguration>"
        ).encode()
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 -- S3's rule
        await self._send(
            "PutBucketCors",
            "PUT",
            "",
            query=(("cors", ""),),
            headers={"content-md5": md5, "content-type": "application/xml"},
            payload_sha256=hashlib.sha256(body).hexdigest(),
            data=body,
            sse=False,
        )

    async def list_objects(self, prefix: str) -> list[ListedObject]:
        """The objects under ``prefix`` (ListObjectsV2, every page), in key order."""
        out: list[ListedObject] = []
        token: Query = ()
        while True:
            query: Query = (("list-type", "2"), ("prefix", prefix), *token)
            _, body = await self._send(
                "ListObjectsV2", "GET", "", query=query, read=True, sse=False
            )
            text = body.decode("utf-8", "replace")
            for block in CONTENTS.findall(text):
                size = _xml_text(block, "Size")
                etag = _xml_text(block, "ETag").strip('"')
                out.append(ListedObject(_xml_text(block, "Key"), int(size or 0), etag))
            nxt = _xml_text(text, "NextContinuationToken")
            if _xml_text(text, "IsTruncated") != "true" or not nxt:
                return out
            token = (("continuation-token", nxt),)

    async def copy(self, source: str, key: str, size: int) -> None:
        """Copy the ``size``-byte object ``source`` to ``key`` inside the bucket: CopyObject up to
        :data:`COPY_LIMIT`, UploadPartCopy in equal parts above it."""
        headers = {"x-amz-copy-source": quote(f"/{self.cfg.bucket}/{source}", safe="/-_.~")}
        for name, value in sse_headers(self.cfg.sse_c_key).items():
            # An encrypted source is read with the same key the copy is written with.
            headers[name.replace("x-amz-", "x-amz-copy-source-", 1)] = value
        if size > COPY_LIMIT:
            await self._copy_parts(source, key, size, headers)
            return
        _, body = await self._send("CopyObject", "PUT", key, headers=headers, read=True)
        _copy_failed("CopyObject", source, key, body)

    async def _copy_parts(self, source: str, key: str, size: int, headers: dict[str, str]) -> None:
        _, created = await self._send(
            "CreateMultipartUpload", "POST", key, query=(("uploads", ""),), read=True
        )
        m = UPLOAD_ID.search(created.decode("utf-8", "replace"))
        if m is None:
            raise R2Error(f"R2 CreateMultipartUpload {key} answered without an UploadId")
        upload_id = unescape(m.group(1))
        self._live.add(upload_id)
        try:
            done = []
            for p in plan_parts(size, self.cfg.part_size):
                rng = {"x-amz-copy-source-range": f"bytes={p.offset}-{p.offset + p.size - 1}"}
                query = (("partNumber", str(p.number)), ("uploadId", upload_id))
                _, body = await self._send(
                    "UploadPartCopy", "PUT", key, query=query, headers={**headers, **rng}, read=True
                )
                _copy_failed("UploadPartCopy", source, key, body)
                etag = _xml_text(body.decode("utf-8", "replace"), "ETag")
                if not etag:
                    raise R2Error(f"R2 UploadPartCopy {key} #{p.number} answered without an ETag")
                done.append(
                    f"<Part><PartNumber>{p.number}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
                )
            doc = (
                '<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                + "".join(done)
                + "</CompleteMultipartUpload>"
            ).encode()
            _, answer = await self._send(
                "CompleteMultipartUpload",
                "POST",
                key,
                query=(("uploadId", upload_id),),
                headers={"Content-Type": "application/xml"},
                payload_sha256=hashlib.sha256(doc).hexdigest(),
                data=doc,
                read=True,
            )
            _copy_failed("CompleteMultipartUpload", source, key, answer)
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise
        finally:
            self._live.discard(upload_id)

    async def delete(self, key: str) -> None:
        """Delete ``key`` (deleting a missing key succeeds)."""
        await self._send("DeleteObject", "DELETE", key, sse=False)

    # -- verification -----------------------------------------------------------------------------

    async def verify_blob(self, cid: Cid, size: int, path: Path | None) -> bool:
        """True when ``blobs/<cid>`` is whole: HEAD size and SHA-256 checksum match.

        A multipart object's composite checksum is recomputed from ``path`` (the local copy).
        An object whose head gives no checksum to check (written by another tool, such as rclone
        or a bucket copy, or multipart without its part size or a local copy) is read and every
        byte hashed: one more GET, never a false "wrong", which would delete a good object.
        """
        info = await self.head(blob_key(cid))
        if info is None or info.size != size:
            return False
        if not info.checksum_sha256:
            return await self._hashes_to(cid, size)
        value, _, count = info.checksum_sha256.partition("-")
        if info.part_size is None and not count:
            return value == b64_digest(digest_of(cid))
        if path is None or info.part_size is None:
            return await self._hashes_to(cid, size)
        try:
            expected = await asyncio.to_thread(_composite_of_file, path, size, info.part_size)
        except (OSError, ValueError):
            return False
        if expected is None:  # the file is shorter than the object
            return False
        exp_value, _, exp_count = expected.partition("-")
        return value == exp_value and (not count or count == exp_count)

    async def _hashes_to(self, cid: Cid, size: int) -> bool:
        """Whether ``blobs/<cid>`` read whole is ``size`` bytes that hash to ``cid``."""
        opened = await self.open(blob_key(cid))
        if opened is None:
            return False
        got, body = opened
        h = hashlib.sha256()
        n = 0
        try:
            if got != size:
                return False
            async for chunk in body:
                n += len(chunk)
                # large chunks hash off the loop (hashlib releases the GIL)
                await asyncio.to_thread(h.update, chunk)
        finally:
            await body.aclose()
        return n == size and h.digest() == digest_of(cid)


def _copy_failed(op: str, source: str, key: str, body: bytes) -> None:
    """Raise if a copy answered 200 with an error in its body (S3 sends the head early)."""
    code = ERROR_CODE.search(body)
    if code is not None:
        raise R2Error(f"R2 {op} {source} -> {key} failed: {code.group(1).decode()}")


def _xml_text(xml: str, tag: str) -> str:
    m = re.search(f"<{tag}>([^<]*)</{tag}>", xml)
    return unescape(m.group(1)) if m else ""


def _xml_time(value: str) -> float:
    """An S3 timestamp as Unix time (0.0, i.e. "long ago", if unreadable)."""
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return 0.0


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(READ_BACKOFF_S * 2 ** (attempt - 1))


class GetBody:
    """A GET body as gathered chunks (see :meth:`R2Client.open`), resumed when cut.

    :meth:`aclose` frees the connection whether or not the body was iterated.
    """

    def __init__(
        self, client: R2Client, resp: aiohttp.ClientResponse, key: str, size: int, attempt: int
    ) -> None:
        self._resp = resp
        self._gen = self._chunks(client, key, size, attempt)

    async def _chunks(
        self, client: R2Client, key: str, size: int, attempt: int
    ) -> AsyncGenerator[bytes, None]:
        got = 0
        buf: list[bytes] = []
        held = 0
        while True:
            try:
                async for data in self._resp.content.iter_any():
                    got += len(data)
                    if got == len(data):  # the very first bytes go out at once
                        yield data
                        continue
                    buf.append(data)
                    held += len(data)
                    if held >= CHUNK:
                        yield b"".join(buf)
                        buf, held = [], 0
                if got != size:
                    raise aiohttp.ClientPayloadError(f"{got} of {size} bytes")
                break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                self._resp.close()
                cut = R2Error(f"R2 GET {key} ended after {got} of {size} bytes: {exc}")
                if isinstance(exc, TimeoutError) or attempt >= READ_ATTEMPTS:
                    raise cut from exc
            # Cut midway: ask for the rest (bytes aiohttp had buffered when the cut came are
            # lost with it, so "the rest" starts after the last byte handed on).
            await _backoff(attempt)
            attempt += 1
            resp = await client._get(key, got)
            if resp is None or not _resumes(resp, got, size):
                if resp is not None:
                    resp.close()
                raise R2Error(f"R2 GET {key} could not be resumed at {got} of {size} bytes")
            self._resp = resp
        if buf:
            yield b"".join(buf)
        self._resp.release()

    def __aiter__(self) -> GetBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop reading and release the connection (closed unless the body was read whole)."""
        try:
            await self._gen.aclose()
        finally:
            if self._resp.content.is_eof():
                self._resp.release()
            else:
                self._resp.close()


def _resumes(resp: aiohttp.ClientResponse, start: int, size: int) -> bool:
    """Whether an answer carries bytes ``start..size-1`` of the ``size``-byte object."""
    if not start:
        return resp.status == 200 and resp.content_length == size
    want = f"bytes {start}-{size - 1}/{size}"
    return resp.status == 206 and resp.headers.get("Content-Range", "") == want


def _composite_of_file(path: Path, size: int, part_size: int) -> str | None:
    digests = []
    for p in plan_parts(size, part_size):
        if (digest := hash_file(path, p.offset, p.size)) is None:
            return None
        digests.append(digest)
    return composite_checksum(digests)
