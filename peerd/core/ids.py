"""Content ids.

A blob's id is the SHA-256 of its bytes written as a CIDv1 with the ``raw`` codec (0x55) and a
sha2-256 multihash (0x12, 32 bytes), in lowercase base32 multibase (prefix ``b``)::

    b + base32( 0x01 0x55 0x12 0x20 <32-byte digest> )      e.g. bafkrei...

The same string works as a DHT provider key for any libp2p node, and as a file name.
"""

from __future__ import annotations

import base64
import hashlib
from typing import NewType

from peerd.errors import BadRequest

Cid = NewType("Cid", str)

_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])
_CID_LEN = 59  # "b" + base32 of 36 bytes without padding


def cid_from_digest(digest: bytes) -> Cid:
    """The CID string for a SHA-256 digest."""
    if len(digest) != 32:
        raise ValueError("sha-256 digest must be 32 bytes")
    text = base64.b32encode(_PREFIX + digest).decode("ascii").rstrip("=").lower()
    return Cid("b" + text)


def cid_of(data: bytes | bytearray | memoryview) -> Cid:
    """The CID of some bytes."""
    return cid_from_digest(hashlib.sha256(data).digest())


def digest_of(cid: str) -> bytes:
    """The SHA-256 digest inside a CID; raises :class:`BadRequest` if it is not a peerd CID."""
    if len(cid) != _CID_LEN or not cid.startswith("b"):
        raise BadRequest(f"not a content id: {cid[:80]!r}")
    body = cid[1:].upper() + "=" * (-(len(cid) - 1) % 8)
    try:
        raw = base64.b32decode(body)
    except ValueError as exc:
        raise BadRequest(f"not a content id: {cid[:80]!r}") from exc
    if raw[:4] != _PREFIX or len(raw) != 36:
        raise BadRequest(f"not a raw sha2-256 CIDv1: {cid[:80]!r}")
    return raw[4:]


def parse_cid(text: str) -> Cid:
    """Validate and return ``text`` as a :data:`Cid` (the canonical lowercase form)."""
    digest = digest_of(text)
    cid = cid_from_digest(digest)
    if cid != text:
        raise BadRequest(f"content id is not in canonical form: {text[:80]!r}")
    return cid


def is_cid(text: str) -> bool:
    """True if ``text`` is a canonical peerd CID."""
    try:
        parse_cid(text)
    except BadRequest:
        return False
    return True


def shard_of(cid: Cid) -> str:
    """Two hex characters of the digest, used to fan blob files out over 256 directories."""
    return digest_of(cid)[:1].hex()


class Hasher:
    """Incremental CID computation for streamed bytes."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed more bytes."""
        self._h.update(data)
        self.size += len(data)

    def cid(self) -> Cid:
        """The CID of everything fed so far."""
        return cid_from_digest(self._h.digest())
