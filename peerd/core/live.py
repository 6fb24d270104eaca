"""Live inputs: what an ingest protocol hands the node, and who may publish (pure, no I/O).

Theory of operation
-------------------
A *live input* is a named, configured publishing point (``[live] inputs``), each with its own
stream key, a secret read from a file (``live-<name>.key`` in the secrets directory or systemd
credentials), never from the TOML file. Publishers reach an input over RTMP/RTMPS (the stream
name is the key, as OBS sends it) or WHIP (``POST /whip/<input>`` with ``Authorization: Bearer
<key>``). Keys are compared in constant time (:func:`match_key`), against every input whatever the
outcome, so a wrong key costs the same as a right one.

Every ingest protocol turns what it receives into the same two things, so the packager, WHEP
fan-out and recorder never know how a stream arrived:

* :class:`LiveTrack` per elementary stream, announced once before any frame (its codec
  configuration: ``avcC`` for H.264, AudioSpecificConfig for AAC, OpusHead or nothing for Opus);
* :class:`LiveFrame` per access unit, on the track's own clock (``timescale`` ticks per second),
  H.264 as length-prefixed NAL units (4-byte lengths, as in MP4), AAC raw, Opus one packet.

A :class:`LiveSink` receives them on the event loop; its methods never block (the sink queues
work for its own threads). One input has at most one publisher: a second one is refused
(:class:`~peerd.errors.Conflict`) while the first is connected, and a publisher that vanishes
ends its publication with a reason.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["video", "audio"]
Codec = Literal["h264", "aac", "opus"]
Protocol_ = Literal["rtmp", "rtmps", "whip"]


@dataclass(frozen=True)
class LiveTrack:
    """One elementary stream of a live input, as its publisher announced it."""

    index: int
    kind: Kind
    codec: Codec
    timescale: int  # ticks per second of the frames' dts/pts
    config: bytes  # avcC (h264), AudioSpecificConfig (aac), OpusHead or b"" (opus)
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0


@dataclass(frozen=True)
class LiveFrame:
    """One access unit of a live track."""

    track: int  # LiveTrack.index
    dts: int  # in the track's timescale
    pts: int
    keyframe: bool
    data: bytes  # h264: 4-byte length-prefixed NAL units; aac: raw frame; opus: one packet


class LiveSink(Protocol):
    """Where an ingest adapter delivers a publication (called on the event loop, never blocks)."""

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """The publication's tracks, once, before any frame."""

    def frame(self, frame: LiveFrame) -> None:
        """One access unit, in decode order per track."""

    def end(self, reason: str) -> None:
        """The publisher stopped (``"unpublished"``) or vanished (the cause); no call follows."""


@dataclass(frozen=True)
class Publication:
    """An accepted publisher: the input it publishes to, and where its media goes."""

    input: str
    protocol: Protocol_
    sink: LiveSink


class LiveInputs(Protocol):
    """The node's live service as ingest adapters see it (:mod:`peerd.live`)."""

    def open(self, key: str, *, input: str | None, protocol: Protocol_, remote: str) -> Publication:
        """Accept a publisher with ``key`` (for ``input``, or whichever input the key is for).

        Raises :class:`~peerd.errors.Unauthorized` for a key that matches no input (or not the
        named one), :class:`~peerd.errors.NotFound` for an unknown named input and
        :class:`~peerd.errors.Conflict` while the input already has a publisher.
        """
        ...


def match_key(key: str, keys: Iterable[tuple[str, str]]) -> str | None:
    """The name of the input whose key equals ``key`` (constant time per compare, every key
    compared), or ``None``. ``keys`` is (input name, key) pairs; an empty key never matches."""
    found: str | None = None
    given = key.encode()
    for name, secret in keys:
        equal = hmac.compare_digest(given, secret.encode())
        if equal and secret and found is None:
            found = name
    return found
