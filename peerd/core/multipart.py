"""Multipart upload planning under R2's rules, and the checksums that go with it.

R2 accepts a multipart upload only when every part except the last has the same size, and that
size is at least 5 MiB (the last part may be smaller); an upload has at most 10 000 parts. S3
tolerates unequal parts, and test servers check neither rule, so the plan is made here, in one
pure function, and tested directly.

A multipart object uploaded with SHA-256 part checksums reports a *composite* checksum:
``base64(sha256(d1 || d2 || ... || dn)) + "-n"`` where ``di`` is the SHA-256 digest of part ``i``.
:func:`composite_checksum` computes it so an upload can be verified with one HEAD.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 1024 * 1024
MIN_PART = 5 * MIB
MAX_PARTS = 10_000


@dataclass(frozen=True)
class Part:
    """One part: 1-based ``number``, byte ``offset`` and ``size``."""

    number: int
    offset: int
    size: int


def plan_parts(size: int, part_size: int) -> tuple[Part, ...]:
    """Split ``size`` bytes into equal parts of ``part_size`` (last one smaller or equal).

    ``part_size`` below 5 MiB is refused. When the object would need more than 10 000 parts the
    part size grows (in whole MiB) until it fits.
    """
    if part_size < MIN_PART:
        raise ValueError(f"part size {part_size} is below R2's minimum of {MIN_PART} bytes")
    if size <= 0:
        raise ValueError("a multipart upload needs at least one byte")
    if -(-size // part_size) > MAX_PARTS:
        part_size = -(-size // MAX_PARTS)
        part_size = -(-part_size // MIB) * MIB
    parts = []
    offset = 0
    number = 1
    while offset < size:
        n = min(part_size, size - offset)
        parts.append(Part(number, offset, n))
        offset += n
        number += 1
    return tuple(parts)


def check_plan(parts: tuple[Part, ...], size: int) -> None:
    """Raise ValueError unless ``parts`` cover ``size`` bytes under R2's rules."""
    if not parts:
        raise ValueError("no parts")
    if len(parts) > MAX_PARTS:
        raise ValueError("too many parts")
    first = parts[0].size
    if len(parts) > 1 and first < MIN_PART:
        raise ValueError("parts are smaller than 5 MiB")
    offset = 0
    for i, p in enumerate(parts, 1):
        if p.number != i or p.offset != offset:
            raise ValueError(f"part {i} is out of order")
        last = i == len(parts)
        if (not last and p.size != first) or (last and not 0 < p.size <= first):
            raise ValueError(f"part {i} has size {p.size}, not {first}")
        offset += p.size
    if offset != size:
        raise ValueError(f"parts cover {offset} bytes, not {size}")


def b64_digest(digest: bytes) -> str:
    """A SHA-256 digest as the base64 text S3 checksum headers carry."""
    return base64.b64encode(digest).decode("ascii")


def composite_checksum(part_digests: Iterable[bytes]) -> str:
    """The composite SHA-256 checksum of a multipart object from its parts' digests."""
    digests = list(part_digests)
    return b64_digest(hashlib.sha256(b"".join(digests)).digest()) + f"-{len(digests)}"
