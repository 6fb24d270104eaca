"""Claims on bucket uploads: which node packages an upload (pure: no I/O, ``now`` passed in).

Media enters the network as a source file put into the bucket under the uploads prefix (by
rclone, wrangler, a dashboard). Nodes that watch the prefix agree, through the bucket alone, on
one of them to package each upload. Key layout (next to ``blobs/`` and ``media/``)::

    uploads/<name>                  the source file (any S3 client puts it; multipart is fine)
    claims/<upload key>/<gen>       claim generation ``gen`` (zero-padded, so listing sorts it):
                                    JSON ``{peer_id, node, until, etag}``
    failed/<upload key>.json        why it could not be packaged; watchers skip the upload while
                                    its ETag is the one named there (a fixed re-upload is new)
    archive/<name>                  where a packaged upload is moved (``[r2] uploads_done``)

Theory of operation. Every claim object is created with ``If-None-Match: *`` (R2 and S3 refuse
a second create of one key with 412), so of the nodes that try to write generation ``n`` of an
upload exactly one succeeds, and it alone packages the upload. A claim holds until its
``until`` (Unix time, written by the claimant); the holder renews it before then by creating
generation ``n + 1`` itself. Once the latest generation has expired (its claimant died or lost
the bucket), any node may create the next one and take the upload over; a former holder whose
renewal finds that generation taken has lost the upload and stops. When the upload is packaged
and published, its holder archives (or deletes) it and then deletes its claims; a corrupt upload
gets a ``failed/`` marker instead and its claims are deleted, so nobody retries it in a loop.
Clocks of nodes only need to agree to well within a claim's lease (NTP does).

Only ``If-None-Match: *`` is relied on (no ``If-Match``), the conditional write R2 documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

CLAIMS = "claims/"
FAILED = "failed/"
GEN_DIGITS = 8


@dataclass(frozen=True)
class Claim:
    """One claim generation: who holds the upload, until when, and of which upload version."""

    gen: int
    peer_id: str
    node: str
    until: float
    etag: str


@dataclass(frozen=True)
class Decision:
    """Whether to claim now: ``take`` generation ``gen``, and why (for logs)."""

    take: bool
    gen: int
    reason: str


def claim_prefix(upload_key: str) -> str:
    """The prefix under which the claims of ``upload_key`` live."""
    return f"{CLAIMS}{upload_key}/"


def claim_key(upload_key: str, gen: int) -> str:
    """The key of claim generation ``gen`` of ``upload_key``."""
    return f"{claim_prefix(upload_key)}{gen:0{GEN_DIGITS}d}"


def failed_key(upload_key: str) -> str:
    """The key of the failure marker of ``upload_key``."""
    return f"{FAILED}{upload_key}.json"


def archive_key(upload_key: str, uploads_prefix: str, archive_prefix: str) -> str:
    """Where ``upload_key`` is archived: its name under ``archive_prefix``."""
    return archive_prefix + upload_key.removeprefix(uploads_prefix)


def gen_of(key: str, upload_key: str) -> int | None:
    """The generation a claim key names (None for anything else under the prefix)."""
    tail = key.removeprefix(claim_prefix(upload_key))
    return int(tail) if tail != key and tail.isdigit() and len(tail) == GEN_DIGITS else None


def latest_gen(keys: Iterable[str], upload_key: str) -> int:
    """The highest claim generation among ``keys`` (0: never claimed)."""
    return max((g for k in keys if (g := gen_of(k, upload_key)) is not None), default=0)


def encode_claim(claim: Claim) -> bytes:
    """A claim's JSON body."""
    body = {
        "peer_id": claim.peer_id,
        "node": claim.node,
        "until": round(claim.until, 3),
        "etag": claim.etag,
    }
    return json.dumps(body, sort_keys=True).encode()


def decode_claim(gen: int, data: bytes) -> Claim | None:
    """A claim from its JSON body; None if the body is not one (taken as expired)."""
    try:
        obj = json.loads(data)
        return Claim(gen, str(obj["peer_id"]), str(obj["node"]), float(obj["until"]), obj["etag"])
    except (ValueError, KeyError, TypeError):
        return None


def decide(latest: Claim | None, gen: int, now: float) -> Decision:
    """Whether to claim an upload whose latest claim generation is ``gen`` (0: none), with body
    ``latest`` (None: unreadable, i.e. void), at ``now``."""
    if gen == 0:
        return Decision(True, 1, "unclaimed")
    if latest is not None and latest.until > now:
        return Decision(
            False,
            gen,
            f"claimed by {latest.node} ({latest.peer_id}) for {latest.until - now:.0f} s more",
        )
    who = f"{latest.node} ({latest.peer_id})" if latest is not None else "an unreadable claim"
    return Decision(True, gen + 1, f"the claim of {who} expired")


def is_failed(marker: bytes | None, etag: str) -> str | None:
    """The reason in a failure marker when it names the upload version ``etag``, else None."""
    if marker is None:
        return None
    try:
        obj = json.loads(marker)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("etag") != etag:
        return None
    return str(obj.get("reason") or "failed")


def failure_marker(etag: str, size: int, reason: str, peer_id: str, node: str, at: float) -> bytes:
    """A failure marker's JSON body."""
    body = {
        "etag": etag,
        "size": size,
        "reason": reason,
        "peer_id": peer_id,
        "node": node,
        "at": round(at, 3),
    }
    return json.dumps(body, sort_keys=True).encode()
