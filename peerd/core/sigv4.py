"""AWS Signature Version 4 for S3-style requests (R2 speaks it), as pure functions.

The hot path of the R2 client (blob PUT, HEAD, GET, part uploads) sends its requests with
aiohttp and signs them here instead of going through boto3. The signature covers the method,
the path, the query, every header handed in (names lower-cased, values trimmed) and the payload
hash, which the caller passes in: for a blob it is the digest inside its cid, so signing costs
no hashing. Tests compare the output with botocore's ``SigV4Auth`` for the same inputs.

Reference: the SigV4 specification ("Create a signed AWS API request"): canonical request ->
string to sign -> HMAC chain over date, region, service, ``aws4_request``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class SigningKey:
    """Who signs, and for which region and service."""

    access_key_id: str
    secret_access_key: str
    region: str = "auto"
    service: str = "s3"

    def __repr__(self) -> str:
        # Never print the secret (logs, tracebacks).
        return f"SigningKey({self.access_key_id!r}, region={self.region!r})"


def amz_date(now: float) -> str:
    """``now`` (a Unix time) as SigV4's ``YYYYMMDDTHHMMSSZ``."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")


def uri_encode(value: str, *, keep_slash: bool = False) -> str:
    """Percent-encode everything but ``A-Z a-z 0-9 - _ . ~`` (and ``/`` in a path)."""
    return quote(value, safe="-_.~/" if keep_slash else "-_.~")


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    """The query string in canonical form (encoded, sorted by name then value)."""
    pairs = sorted((uri_encode(k), uri_encode(v)) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


@lru_cache(maxsize=8)
def _derived_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


def sign(
    key: SigningKey,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_sha256: str,
    now: float,
) -> dict[str, str]:
    """The headers to send: ``headers`` plus ``x-amz-date``, ``x-amz-content-sha256`` and
    ``Authorization``.

    ``path`` is the raw (unencoded) object path, e.g. ``/bucket/blobs/<cid>``; the caller sends
    it encoded the same way (:func:`uri_encode` with ``keep_slash``). ``headers`` must include
    ``host`` exactly as it will be sent. ``payload_sha256`` is the hex SHA-256 of the body
    (:data:`EMPTY_SHA256` for none).
    """
    stamp = amz_date(now)
    out = dict(headers)
    out["x-amz-date"] = stamp
    out["x-amz-content-sha256"] = payload_sha256
    canon = {k.lower().strip(): " ".join(str(v).split()) for k, v in out.items()}
    names = sorted(canon)
    signed = ";".join(names)
    request = "\n".join(
        (
            method.upper(),
            uri_encode(path, keep_slash=True),
            canonical_query(query),
            "".join(f"{n}:{canon[n]}\n" for n in names),
            signed,
            payload_sha256,
        )
    )
    scope = f"{stamp[:8]}/{key.region}/{key.service}/aws4_request"
    to_sign = "\n".join((ALGORITHM, stamp, scope, hashlib.sha256(request.encode()).hexdigest()))
    derived = _derived_key(key.secret_access_key, stamp[:8], key.region, key.service)
    signature = hmac.new(derived, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{ALGORITHM} Credential={key.access_key_id}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return out
