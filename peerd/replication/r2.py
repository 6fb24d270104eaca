"""The R2 client: boto3 configured for R2's rules, every blocking call in a bounded executor.

Key layout in the bucket::

    blobs/<cid>            one blob, immutable; written once with ``If-None-Match: *`` and an
                           explicit SHA-256 checksum (single PUT) or SHA-256 part checksums
                           (multipart, equal parts >= 5 MiB, see :mod:`peerd.core.multipart`)
    media/<media id>.json  a media item's canonical manifest (its bytes hash to the media id)

R2 specifics: region ``auto``; no ACL or tagging headers are ever sent; botocore's automatic
checksums are off (``when_required``, R2 rejects some of what boto3 >= 1.36 sends by default)
and the SHA-256 checksum is sent explicitly instead -- for a blob it is the digest inside its
cid, so it costs no hashing for single PUTs. botocore's own retries are off: the outbox retries
with its own backoff and records every error, and a read-through miss makes exactly one GET.

An upload is *verified* when a HEAD (with ``x-amz-checksum-mode: ENABLED``) reports the expected
size and checksum: the blob's digest for a single PUT, or the composite checksum of the parts
(recomputed from the local file with the part size recorded in the object's metadata).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from peerd.core.ids import Cid, digest_of
from peerd.core.multipart import b64_digest, check_plan, composite_checksum, plan_parts
from peerd.errors import ConfigError, UpstreamError

log = logging.getLogger("peerd.replication")

T = TypeVar("T")
CHUNK = 256 * 1024
FIRST_CHUNK = 16 * 1024
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


def _is_missing(exc: Exception) -> bool:
    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status == 404 or code in ("NoSuchKey", "NotFound", "404")


class R2Client:
    """Async facade over one boto3 S3 client for one bucket."""

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

    @classmethod
    async def create(
        cls, cfg: R2Config, *, on_request: Callable[[str], None] | None = None
    ) -> R2Client:
        """Build the client (boto3 session set-up takes ~0.25 s, so it runs in a thread)."""
        return cls(cfg, await asyncio.to_thread(make_s3, cfg), on_request=on_request)

    async def close(self) -> None:
        """Stop the executor (waiting for calls in flight) and close connections."""
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

        def do() -> ObjectInfo | None:
            self._count("HeadObject")
            try:
                r = self._s3.head_object(
                    Bucket=self.bucket, Key=key, ChecksumMode="ENABLED", **self._sse()
                )
            except (ClientError, BotoCoreError) as exc:
                if _is_missing(exc):
                    return None
                raise _error("HEAD", key, exc) from exc
            meta = r.get("Metadata") or {}
            part = meta.get(PART_SIZE_META)
            return ObjectInfo(
                size=int(r["ContentLength"]),
                checksum_sha256=r.get("ChecksumSHA256"),
                part_size=int(part) if part and part.isdigit() else None,
            )

        return await self._call(do)

    async def open(self, key: str, chunk: int = CHUNK) -> tuple[int, AsyncIterator[bytes]] | None:
        """Start a GET: (size, body chunks), or None if the object does not exist.

        Each chunk is read in the executor; closing the iterator closes the connection.
        """

        def start() -> Any:
            self._count("GetObject")
            try:
                return self._s3.get_object(Bucket=self.bucket, Key=key, **self._sse())
            except (ClientError, BotoCoreError) as exc:
                if _is_missing(exc):
                    return None
                raise _error("GET", key, exc) from exc

        resp = await self._call(start)
        if resp is None:
            return None
        size = int(resp["ContentLength"])
        body = resp["Body"]

        def read(n: int = chunk) -> bytes:
            try:
                data: bytes = body.read(n)
            except (BotoCoreError, OSError, ValueError) as exc:
                raise R2Error(f"R2 GET {key} failed mid-body: {type(exc).__name__}") from exc
            return data

        async def chunks() -> AsyncIterator[bytes]:
            got = 0
            try:
                while True:
                    # A small first read: the viewer's first byte need not wait for a full chunk.
                    data = await self._call(read if got else functools.partial(read, FIRST_CHUNK))
                    if not data:
                        break
                    got += len(data)
                    yield data
                if got != size:
                    raise R2Error(f"R2 GET {key} ended after {got} of {size} bytes")
            finally:
                await self._call(body.close)

        return size, chunks()

    async def get_bytes(self, key: str, limit: int = 64 * 1024 * 1024) -> bytes | None:
        """A whole (small) object, or None if it does not exist."""
        got = await self.open(key)
        if got is None:
            return None
        size, chunks = got
        if size > limit:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise R2Error(f"R2 object {key} is larger than {limit} bytes")
        return b"".join([c async for c in chunks])

    # -- writes -----------------------------------------------------------------------------------

    def _put_object(
        self,
        key: str,
        body: bytes | BinaryIO,
        checksum: str,
        content_type: str,
        content_length: int | None = None,
    ) -> None:
        """One conditional single-part PUT with an explicit SHA-256 (runs in the executor)."""
        self._count("PutObject")
        extra: dict[str, Any] = {} if content_length is None else {"ContentLength": content_length}
        try:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
                IfNoneMatch="*",
                **extra,
                **self._sse(),
            )
        except (ClientError, BotoCoreError) as exc:
            raise _error("PUT", key, exc) from exc

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Create ``key`` with ``data`` (If-None-Match: *). :class:`AlreadyExists` if present."""
        checksum = b64_digest(hashlib.sha256(data).digest())
        await self._call(lambda: self._put_object(key, data, checksum, content_type))

    async def put_blob(self, cid: Cid, path: Path, size: int) -> None:
        """Upload a blob file; single PUT below the multipart threshold, else multipart."""
        key = blob_key(cid)
        if size < self.cfg.multipart_threshold:
            checksum = b64_digest(digest_of(cid))

            def do() -> None:
                with path.open("rb") as f:
                    self._put_object(key, f, checksum, "application/octet-stream", size)

            await self._call(do)
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

        def upload(number: int, offset: int, n: int) -> dict[str, Any]:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(n)
            if len(data) != n:
                raise R2Error(f"local file {path} shrank while uploading")
            checksum = b64_digest(hashlib.sha256(data).digest())
            self._count("UploadPart")
            try:
                r = self._s3.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
                    **self._sse(),
                )
            except (ClientError, BotoCoreError) as exc:
                raise _error("UploadPart", key, exc) from exc
            return {"ETag": r["ETag"], "PartNumber": number, "ChecksumSHA256": checksum}

        try:
            done = await asyncio.gather(
                *(self._call(functools.partial(upload, p.number, p.offset, p.size)) for p in parts)
            )

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
