"""The R2 client: signed aiohttp requests on the hot path, boto3 (in a bounded executor) for
the rest, both configured for R2's rules.

Key layout in the bucket::

    blobs/<cid>            one blob, immutable; written once with ``If-None-Match: *`` and an
                           explicit SHA-256 checksum (single PUT) or SHA-256 part checksums
                           (multipart, equal parts >= 5 MiB, see :mod:`peerd.core.multipart`)
    media/<media id>.json  a media item's canonical manifest (its bytes hash to the media id)

Blob PUTs, HEADs and multipart part uploads go through :mod:`peerd.replication.s3http` (one
keep-alive pool, SigV4 from :mod:`peerd.core.sigv4`): boto3 in a thread cost ~2.5x rclone's
push time and most of a cold miss's first-byte latency on loopback. Object GETs go through
:mod:`peerd.replication.s3get` (a plain asyncio protocol with a spare connection kept open),
whose body the resolver taps in the connection's callback. Multipart
create/complete/abort and DELETE stay on boto3 (rare, and their XML is boto3's job).

R2 specifics: region ``auto``; no ACL or tagging headers are ever sent; botocore's automatic
checksums are off (``when_required``, R2 rejects some of what boto3 >= 1.36 sends by default)
and the SHA-256 checksum is sent explicitly instead -- for a blob it is the digest inside its
cid, so it costs no hashing for single PUTs. No retries inside the client: the outbox retries
with its own backoff and records every error, and a read-through miss makes exactly one GET.

An upload is *verified* when a HEAD (with ``x-amz-checksum-mode: ENABLED``) reports the expected
size and checksum: the blob's digest for a single PUT, or the composite checksum of the parts
(recomputed from the local file with the part size recorded in the object's metadata).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from peerd.core.ids import Cid, digest_of
from peerd.core.multipart import b64_digest, check_plan, composite_checksum, plan_parts
from peerd.core.sigv4 import EMPTY_SHA256, SigningKey
from peerd.errors import ConfigError, UpstreamError
from peerd.replication.s3get import ERROR_BODY_MAX, GetError, GetPool, GetResponse
from peerd.replication.s3http import ERROR_CODE, HttpStatusError, LocalMismatch, S3Http, file_body

log = logging.getLogger("peerd.replication")

T = TypeVar("T")
CHUNK = 256 * 1024
PART_SIZE_META = "peerd-part-size"


class R2Error(UpstreamError):
    """A request to R2 failed. ``throttled``: the server asked us to slow down."""

    def __init__(self, message: str, *, throttled: bool = False, **detail: Any) -> None:
        super().__init__(message, **detail)
        self.throttled = throttled


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


_session_lock = threading.Lock()
_session: Any = None


def make_s3(cfg: R2Config) -> Any:
    """A boto3 S3 client configured for R2 (see the module doc). Blocking.

    One boto3 session per process: it caches the parsed service model, which otherwise costs
    ~0.25 s of CPU per client. Sessions are not thread-safe, hence the lock.
    """
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _make_client(_session, cfg)


def _make_client(session: Any, cfg: R2Config) -> Any:
    return session.client(
        "s3",
        endpoint_url=cfg.endpoint,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        config=Config(
            region_name=cfg.region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            max_pool_connections=cfg.max_concurrency * 2,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def _error(op: str, key: str, exc: Exception) -> R2Error:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        throttled = code in ("SlowDown", "TooManyRequests", "ServiceUnavailable") or status in (
            429,
            503,
        )
        cls = AlreadyExists if status == 412 else R2Error
        return cls(
            f"R2 {op} {key} failed: {status} {code}".strip(),
            throttled=throttled,
            status_code=status,
        )
    return R2Error(f"R2 {op} {key} failed: {type(exc).__name__}: {exc}")


def _http_error(op: str, key: str, exc: BaseException) -> R2Error:
    """An :class:`R2Error` for a failure of the aiohttp path (same shape as :func:`_error`)."""
    if isinstance(exc, HttpStatusError):
        throttled = exc.code in ("SlowDown", "TooManyRequests", "ServiceUnavailable") or (
            exc.status in (429, 503)
        )
        cls = AlreadyExists if exc.status == 412 else R2Error
        return cls(str(exc), throttled=throttled, status_code=exc.status)
    if isinstance(exc, LocalMismatch):
        return R2Error(f"R2 {op} {key} refused: {exc}")
    return R2Error(f"R2 {op} {key} failed: {type(exc).__name__}: {exc}")


_HTTP_ERRORS = (HttpStatusError, LocalMismatch, aiohttp.ClientError, TimeoutError, OSError)


def _is_missing(exc: Exception) -> bool:
    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status == 404 or code in ("NoSuchKey", "NotFound", "404")


class R2Client:
    """Async facade for one bucket: the hot path (blob PUT, HEAD, GET, part uploads) over
    aiohttp (:mod:`peerd.replication.s3http`), the rest (multipart create/complete/abort,
    DELETE) through boto3 in a bounded executor. Build it inside the running loop."""

    def __init__(
        self, cfg: R2Config, s3: Any, *, on_request: Callable[[str], None] | None = None
    ) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self._s3 = s3
        self._on_request = on_request
        self._executor = ThreadPoolExecutor(
            max_workers=cfg.max_concurrency, thread_name_prefix="ThreadPoolExecutor-r2"
        )
        self.http = S3Http(
            cfg.endpoint,
            cfg.bucket,
            SigningKey(cfg.access_key_id, cfg.secret_access_key, cfg.region),
            max_concurrency=cfg.max_concurrency,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            sse_c_key=cfg.sse_c_key,
        )
        self.gets = GetPool(
            cfg.endpoint,
            limit=cfg.max_concurrency * 2,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            spare=True,
        )

    @classmethod
    async def create(
        cls, cfg: R2Config, *, on_request: Callable[[str], None] | None = None
    ) -> R2Client:
        """Build the client (boto3 session set-up takes ~0.25 s, so it runs in a thread)."""
        return cls(cfg, await asyncio.to_thread(make_s3, cfg), on_request=on_request)

    async def close(self) -> None:
        """Stop the executor (waiting for calls in flight) and close connections."""
        await self.http.close()
        await self.gets.close()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._s3.close()

    async def _call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    def _count(self, op: str) -> None:
        if self._on_request is not None:
            self._on_request(op)

    def _sse(self) -> dict[str, Any]:
        if self.cfg.sse_c_key is None:
            return {}
        # boto3 base64-encodes the key and adds its MD5 itself.
        return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": self.cfg.sse_c_key}

    # -- reads ------------------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        """Size and checksum of an object; None if it does not exist."""
        self._count("HeadObject")
        try:
            resp = await self.http.request(
                "HEAD", "HEAD", key, headers={"x-amz-checksum-mode": "ENABLED"}
            )
        except _HTTP_ERRORS as exc:
            raise _http_error("HEAD", key, exc) from exc
        resp.release()
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
        )

    async def open(self, key: str, chunk: int = CHUNK) -> tuple[int, GetBody] | None:
        """Start a GET: (size, body chunks), or None if the object does not exist.

        The GET goes over :class:`~peerd.replication.s3get.GetPool` (a plain asyncio protocol):
        its body can be tapped (:meth:`GetBody.tap`) as bytes arrive, in the connection's own
        callback. Iterated, the first chunk is whatever arrived first (a viewer's first byte
        waits for nothing more); later ones are gathered to about ``chunk`` bytes. A body that
        ends early raises :class:`R2Error`. Closing the iterator (or finishing it) releases the
        connection.
        """
        self._count("GetObject")
        target, headers = self.http.signed_get(key)
        try:
            resp = await self.gets.get(target, headers)
        except GetError as exc:
            raise R2Error(f"R2 GET {key} failed: {exc}") from exc
        if resp.status >= 300:
            code = ""
            try:
                if resp.length is not None and resp.length <= ERROR_BODY_MAX:
                    # Read whole, so the connection is kept (every bucket miss is a 404).
                    m = ERROR_CODE.search(await resp.read(ERROR_BODY_MAX))
                    code = m.group(1).decode("utf-8", "replace") if m else ""
            except GetError:
                pass
            finally:
                resp.release()
            if resp.status == 404:
                return None
            raise _http_error("GET", key, HttpStatusError(resp.status, code, "GET", key))
        if resp.length is None:
            resp.close()
            raise R2Error(f"R2 GET {key} answered without a Content-Length")
        return resp.length, GetBody(resp, key, chunk)

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
        query: tuple[tuple[str, str], ...] = (),
        conditional: bool = True,
    ) -> aiohttp.ClientResponse:
        """One signed PUT with an explicit SHA-256; returns the (released) response."""
        self._count(op)
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
        try:
            resp = await self.http.request(
                op,
                "PUT",
                key,
                query=query,
                headers=headers,
                payload_sha256=digest.hex() if size else EMPTY_SHA256,
                data=body,
            )
        except _HTTP_ERRORS as exc:
            raise _http_error(op, key, exc) from exc
        resp.release()
        return resp

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Create ``key`` with ``data`` (If-None-Match: *). :class:`AlreadyExists` if present."""
        digest = hashlib.sha256(data).digest()
        await self._put("PutObject", key, data, digest, len(data), content_type)

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
        parts = plan_parts(size, self.cfg.part_size)
        check_plan(parts, size)
        part_size = parts[0].size

        def create() -> str:
            self._count("CreateMultipartUpload")
            try:
                r = self._s3.create_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    ContentType="application/octet-stream",
                    ChecksumAlgorithm="SHA256",
                    Metadata={PART_SIZE_META: str(part_size)},
                    **self._sse(),
                )
            except (ClientError, BotoCoreError) as exc:
                raise _error("CreateMultipartUpload", key, exc) from exc
            return str(r["UploadId"])

        upload_id = await self._call(create)

        async def upload(number: int, offset: int, n: int) -> dict[str, Any]:
            # Hash the part first (its checksum goes in the signed headers), then stream it;
            # the streaming pass checks the bytes again, so a file changing in between is caught.
            digest = await asyncio.to_thread(_digest_of_range, path, offset, n)
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
            return {"ETag": etag, "PartNumber": number, "ChecksumSHA256": b64_digest(digest)}

        try:
            sem = asyncio.Semaphore(self.cfg.max_concurrency)

            async def bounded(number: int, offset: int, n: int) -> dict[str, Any]:
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
            done = [t.result() for t in tasks]

            def complete() -> None:
                self._count("CompleteMultipartUpload")
                try:
                    self._s3.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": list(done)},
                        IfNoneMatch="*",
                        **self._sse(),
                    )
                except (ClientError, BotoCoreError) as exc:
                    raise _error("CompleteMultipartUpload", key, exc) from exc

            await self._call(complete)
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        def do() -> None:
            self._count("AbortMultipartUpload")
            try:
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (ClientError, BotoCoreError) as exc:
                # R2 aborts stale uploads by itself after 7 days; nothing is lost here.
                log.info("abort of multipart upload failed", extra={"key": key, "error": str(exc)})

        await self._call(do)

    async def delete(self, key: str) -> None:
        """Delete ``key`` (deleting a missing key succeeds)."""

        def do() -> None:
            self._count("DeleteObject")
            try:
                self._s3.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise _error("DELETE", key, exc) from exc

        await self._call(do)

    # -- verification -----------------------------------------------------------------------------

    async def verify_blob(self, cid: Cid, size: int, path: Path | None) -> bool:
        """True when ``blobs/<cid>`` is whole: HEAD size and SHA-256 checksum match.

        A multipart object's composite checksum is recomputed from ``path`` (the local copy);
        without it, only a single-PUT object can be verified.
        """
        info = await self.head(blob_key(cid))
        if info is None or info.size != size or not info.checksum_sha256:
            return False
        value, _, count = info.checksum_sha256.partition("-")
        if info.part_size is None and not count:
            return value == b64_digest(digest_of(cid))
        if path is None or info.part_size is None:
            return False
        part_size = info.part_size
        try:
            expected = await asyncio.to_thread(_composite_of_file, path, size, part_size)
        except (OSError, ValueError):
            return False
        exp_value, _, exp_count = expected.partition("-")
        return value == exp_value and (not count or count == exp_count)


class GetBody:
    """A GET body: its chunks (gathered, see :meth:`R2Client.open`) and a :meth:`tap`.

    :meth:`aclose` frees the connection whether or not the body was iterated.
    """

    def __init__(self, resp: GetResponse, key: str, chunk: int) -> None:
        self._resp = resp
        self._gen = self._chunks(resp, key, chunk)

    def tap(self, fn: Callable[[bytes], None]) -> None:
        """Call ``fn`` with each chunk as it arrives (see :meth:`GetResponse.tap`)."""
        self._resp.tap(fn)

    @staticmethod
    async def _chunks(resp: GetResponse, key: str, chunk: int) -> AsyncGenerator[bytes, None]:
        size = resp.length
        buf: list[bytes] = []
        held = 0
        first = True
        try:
            async for data in resp:
                if first:
                    first = False
                    yield data
                    continue
                buf.append(data)
                held += len(data)
                if held >= chunk:
                    yield b"".join(buf)
                    buf, held = [], 0
        except GetError as exc:
            raise R2Error(
                f"R2 GET {key} ended after {resp.received} of {size} bytes: {exc}"
            ) from exc
        if buf:
            yield b"".join(buf)
        # A body read to its end goes back to the pool; anything else closes the socket.
        resp.release()

    def __aiter__(self) -> GetBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        try:
            await self._gen.aclose()
        finally:
            self._resp.release()


def _digest_of_range(path: Path, offset: int, size: int) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = size
        while left:
            data = f.read(min(left, 1 << 20))
            if not data:
                raise R2Error(f"local file {path} shrank while uploading")
            h.update(data)
            left -= len(data)
    return h.digest()


def _composite_of_file(path: Path, size: int, part_size: int) -> str:
    parts = plan_parts(size, part_size)
    digests = []
    with path.open("rb") as f:
        for p in parts:
            h = hashlib.sha256()
            left = p.size
            while left:
                data = f.read(min(left, 1 << 20))
                if not data:
                    raise ValueError("file shorter than expected")
                h.update(data)
                left -= len(data)
            digests.append(h.digest())
    return composite_checksum(digests)
