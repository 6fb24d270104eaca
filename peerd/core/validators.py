"""Validators, conditional requests and byte ranges of immutable blobs (RFC 9110, sans I/O).

A blob is named by its content id, so its entity tag is the id itself (:func:`blob_etag`): strong
(byte-for-byte identical bodies share it), and the same on every node, whoever stored the copy
and when. Blobs carry no ``Last-Modified``: a file's time differs from node to node and says
nothing about the bytes.

:func:`precondition` evaluates ``If-Match`` and ``If-None-Match`` (RFC 9110 13.2.2, steps 1 and
3; the date conditions are ignored, as without ``Last-Modified`` they must be).
:func:`select_range` decides between the whole body (200), a part (206) and 416 for a GET's
``Range`` under its ``If-Range``:

* ``If-Range`` applies the range only if it is a strong entity tag equal to the blob's; a weak
  tag or a date (there is no ``Last-Modified`` it could match) means "send it all" (13.1.5);
* one ``bytes`` range is served: ``a-b``, ``a-`` or the suffix ``-n``. A range starting at or
  after the end, or the suffix ``-0``, is unsatisfiable: 416 with ``Content-Range: bytes */n``
  (14.1.1: a suffix range needs a non-zero length);
* a Range the server does not implement -- another unit, several ranges, bad syntax -- is
  ignored and the whole body sent, as 14.2 allows.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)


class Part(NamedTuple):
    """What to send: ``status`` (200, 206 or 416), the first byte and how many bytes."""

    status: int
    start: int
    length: int

    def content_range(self, size: int) -> str | None:
        """The ``Content-Range`` of this answer for a ``size``-byte blob (None for a 200)."""
        if self.status == 206:
            return f"bytes {self.start}-{self.start + self.length - 1}/{size}"
        if self.status == 416:
            return f"bytes */{size}"
        return None


def blob_etag(cid: str) -> str:
    """The strong entity tag of a blob: its content id, quoted."""
    return f'"{cid}"'


def _tags(header: str) -> list[tuple[bool, str]] | None:
    """(weak, opaque tag) of each entry of an entity-tag list; None if it does not parse."""
    out: list[tuple[bool, str]] = []
    pos = 0
    header = header.strip()
    while pos < len(header):
        m = _TAG.match(header, pos)
        if m is None:
            return None
        out.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return out


def _matches(header: str, etag: str, *, weak: bool) -> bool:
    """Whether the list in ``header`` names ``etag`` (a quoted strong tag), by the weak or the
    strong comparison; ``*`` names any current representation."""
    if header.strip() == "*":
        return True
    opaque = etag.strip('"')
    return any(t == opaque and (weak or not w) for w, t in _tags(header) or ())


def precondition(etag: str, if_match: str | None, if_none_match: str | None) -> int | None:
    """412 or 304 when a precondition of a GET or HEAD stops it, else None (carry on)."""
    if if_match is not None and not _matches(if_match, etag, weak=False):
        return 412
    if if_none_match is not None and _matches(if_none_match, etag, weak=True):
        return 304
    return None


def select_range(size: int, etag: str, range_: str | None, if_range: str | None) -> Part:
    """The part of a ``size``-byte blob a GET with these ``Range``/``If-Range`` gets."""
    whole = Part(200, 0, size)
    if range_ is None:
        return whole
    if if_range is not None:
        tag = _tags(if_range)
        if tag is None or len(tag) != 1 or tag[0] != (False, etag.strip('"')):
            return whole
    m = _RANGE.fullmatch(range_.strip())
    if m is None:
        return whole
    first, last = m.groups()
    if not first:
        if not last:
            return whole  # "bytes=-": not a range
        n = int(last)
        if n == 0 or size == 0:
            return Part(416, 0, 0)
        start = max(size - n, 0)
        return Part(206, start, size - start)
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < start:
        return whole  # an invalid range-spec: ignored
    if start >= size:
        return Part(416, 0, 0)
    return Part(206, start, end - start + 1)
