"""The ``/peerd/blob/1.0.0`` libp2p protocol: framing, with no I/O.

One blob per stream. The dialer writes the blob's CID as ASCII followed by ``\\n`` (at most
``MAX_REQUEST`` bytes). The listener answers with a 9-byte header — one status byte and the blob
size as an unsigned 64-bit big-endian integer — then, for ``OK``, exactly ``size`` bytes of the
blob, and closes its side. Any other status carries size 0 and no body:

- ``OK`` (0): the blob follows.
- ``NOT_HELD`` (1): the listener does not have it (try another provider).
- ``BUSY`` (2): the listener is at its transfer limit (try another provider, or later).
- ``BAD_REQUEST`` (3): the request was not a canonical CID line.

The dialer checks every byte against the CID before storing or serving (the resolver does).

``/peerd/held/1.0.0`` (:data:`HELD_PROTOCOL_ID`) uses the same framing to ask whether the
listener holds a *full copy* of a media item: the request line is the media id, the answer a
header with size 0, ``OK`` when it holds every blob of the item, ``NOT_HELD`` otherwise. A
peer's tiering asks it before it removes the item from the shared bucket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

PROTOCOL_ID = "/peerd/blob/1.0.0"
HELD_PROTOCOL_ID = "/peerd/held/1.0.0"
MAX_REQUEST = 128
HEADER = struct.Struct(">BQ")


class Status(enum.IntEnum):
    """Answer codes."""

    OK = 0
    NOT_HELD = 1
    BUSY = 2
    BAD_REQUEST = 3


@dataclass(frozen=True)
class Answer:
    """A decoded response header."""

    status: Status
    size: int


def encode_request(cid: str) -> bytes:
    """The request line."""
    data = cid.encode("ascii") + b"\n"
    if len(data) > MAX_REQUEST:
        raise ValueError("content id too long")
    return data


def decode_request(data: bytes) -> str | None:
    """The CID text of a request line, or None if it is not a line of printable ASCII."""
    if not data.endswith(b"\n") or len(data) > MAX_REQUEST:
        return None
    body = data[:-1]
    if not body or not body.isascii() or not body.isalnum():
        return None
    return body.decode("ascii")


def encode_answer(status: Status, size: int = 0) -> bytes:
    """A response header."""
    return HEADER.pack(int(status), size if status == Status.OK else 0)


def decode_answer(data: bytes) -> Answer:
    """Parse a response header; raises ValueError on an unknown status or a short header."""
    if len(data) != HEADER.size:
        raise ValueError("short blob protocol header")
    code, size = HEADER.unpack(data)
    return Answer(Status(code), size)
