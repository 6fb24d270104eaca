"""A sans-I/O RTMP server for publishers: bytes in, bytes out and events (pure, no I/O).

Theory of operation
-------------------
One :class:`RtmpConnection` is one TCP (or TLS) connection from a publisher such as OBS or
``ffmpeg -f flv rtmp://...``. The adapter (:mod:`peerd.live.rtmp`) feeds it every byte it reads
(:meth:`RtmpConnection.receive`, which returns :data:`Event` values), writes out whatever
:meth:`RtmpConnection.data_to_send` returns, answers a :class:`PublishRequested` with
:meth:`~RtmpConnection.accept` or :meth:`~RtmpConnection.reject`, and closes the socket once
:attr:`RtmpConnection.closed` is true and the last bytes are written. Nothing here blocks, sleeps
or reads a clock, so any split of the input into ``receive`` calls gives the same events.

The connection moves through these states::

    HANDSHAKE --C0+C1--> (S0 S1 S2 sent) --C2--> CONNECTING --connect--> CONNECTED
    CONNECTED --publish(name)--> PUBLISH_PENDING --accept()--> PUBLISHING
                                                 --reject()--> CLOSED
    PUBLISHING --FCUnpublish/deleteStream/closeStream--> CONNECTED   (event Unpublished)
    any state --protocol violation, limit, unsupported codec--> CLOSED (event Failed)

*Handshake.* The simple (version 3) handshake of Adobe's RTMP 1.0 specification: S1 carries no
digest, and clients that publish do not check one (ffmpeg checks only when it plays). S2 echoes
C1; C2 is read and ignored.

*Chunk stream.* Messages arrive cut into chunks of at most the peer's chunk size (128 until it
sends Set Chunk Size). Each chunk has a 1-3 byte basic header (format and chunk stream id) and a
message header of 11, 7, 3 or 0 bytes (formats 0-3). Formats 1-3 reuse the previous header's
fields of that chunk stream; their timestamp field is a delta. A timestamp field of 0xFFFFFF
means a 4-byte extended timestamp follows, and then also follows every format 3 chunk of that
chunk stream (continuations included), as librtmp and ffmpeg send them. A format 3 chunk that
starts a new message repeats the previous delta (after a format 0 header, its absolute value:
this is what ffmpeg's writer means by it). A chunk is only consumed once it is whole, so a
partial chunk waits for more bytes without changing any state.

*Commands* (AMF0, message type 20; type 17 is the same after one format byte): ``connect`` is
answered with Window Acknowledgement Size, Set Peer Bandwidth, Set Chunk Size (4096) and
``_result`` NetConnection.Connect.Success; ``releaseStream`` with ``_result``, ``FCPublish``
with ``onFCPublish``, ``createStream`` with ``_result`` and a stream id; ``publish(name)``
becomes :class:`PublishRequested` with the key (the name without any ``?query``).
``FCUnpublish``, ``deleteStream`` and ``closeStream`` end a publication (:class:`Unpublished`,
once). ``play`` is refused: this server only takes publishers.

*Media* (FLV tag bodies): video type 9 with codec id 7 (AVC): AVCPacketType 0 is the ``avcC``,
1 is length-prefixed NAL units with a signed 24-bit composition time offset (pts = dts + cts),
2 is end of sequence (ignored); audio type 8 with sound format 10 (AAC): AACPacketType 0 is the
AudioSpecificConfig, 1 a raw frame. Anything else (Enhanced RTMP FourCCs such as hvc1/av01/vp09,
MP3, Speex, Nellymoser, PCM, H.263, VP6...) ends the connection with :class:`Failed` naming the
codec and what to publish instead.

*Which tracks.* :class:`TracksReady` is emitted once per publication, before any
:class:`Frame`, at the first of: (a) every kind ``onMetaData`` announced (``videocodecid`` /
``audiocodecid`` present) has its sequence header; (b) the first coded frame (a message that is
not a sequence header) arrives. The tracks are the kinds whose sequence header arrived by then,
video first. Frames of a kind without a track are dropped (a publisher sends its headers first;
one that does not gets no such track); a coded frame with no header at all is a violation. A
sequence header repeated unchanged is ignored; a changed one ends the connection (the tracks of a
publication are fixed). Timestamps are RTMP milliseconds (timescale 1000), unwrapped past 2**32
against the previous message, and rebased so the first frame of the publication has dts 0.

*Bounds.* Messages are at most ``max_message`` bytes (8 MiB), at most ``max_chunk_streams``
chunk streams are open, in-flight partial messages together stay under twice ``max_message``,
AMF values nest at most ``max_amf_depth`` deep. Any violation is a :class:`Failed` event; no
exception leaves :meth:`~RtmpConnection.receive`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from peerd.core.live import Kind, LiveFrame, LiveTrack
from peerd.errors import BadRequest, MediaError, PeerdError, TooManyRequests

HANDSHAKE_SIZE = 1536
RTMP_VERSION = 3
OUT_CHUNK_SIZE = 4096
WINDOW_ACK_SIZE = 5_000_000
MAX_MESSAGE = 8 * 1024 * 1024  # the 24-bit length field allows 16 MiB - 1
MAX_CHUNK_STREAMS = 64
MAX_AMF_DEPTH = 16
MAX_STREAMS = 8  # createStream calls per connection

# Message type ids (RTMP 1.0 section 5.4 and 7.1).
SET_CHUNK_SIZE = 1
ABORT = 2
ACK = 3
USER_CONTROL = 4
WINDOW_ACK = 5
SET_PEER_BANDWIDTH = 6
AUDIO = 8
VIDEO = 9
DATA_AMF3 = 15
COMMAND_AMF3 = 17
DATA_AMF0 = 18
COMMAND_AMF0 = 20

_CONTROL_CSID = 2
_COMMAND_CSID = 3

_VIDEO_CODECS = {
    1: "JPEG",
    2: "Sorenson H.263",
    3: "Screen video",
    4: "On2 VP6",
    5: "On2 VP6 with alpha",
    6: "Screen video v2",
    12: "HEVC (non-standard FLV id 12)",
}
_AUDIO_CODECS = {
    0: "linear PCM",
    1: "ADPCM",
    2: "MP3",
    3: "linear PCM (little-endian)",
    4: "Nellymoser 16 kHz",
    5: "Nellymoser 8 kHz",
    6: "Nellymoser",
    7: "G.711 A-law",
    8: "G.711 mu-law",
    11: "Speex",
    14: "MP3 8 kHz",
    15: "device-specific sound",
}
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


class State(enum.Enum):
    """Where a connection is (see the module docstring)."""

    HANDSHAKE = "handshake"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    PUBLISH_PENDING = "publish_pending"
    PUBLISHING = "publishing"
    CLOSED = "closed"


@dataclass(frozen=True)
class Connected:
    """The client sent ``connect`` (the application name from its URL)."""

    app: str


@dataclass(frozen=True)
class PublishRequested:
    """The client asks to publish with this stream key; answer with accept() or reject()."""

    key: str
    app: str


@dataclass(frozen=True)
class TracksReady:
    """The publication's tracks, once, before any :class:`Frame`."""

    tracks: tuple[LiveTrack, ...]


@dataclass(frozen=True)
class Frame:
    """One access unit of the publication (timescale 1000, rebased to start at 0)."""

    frame: LiveFrame


@dataclass(frozen=True)
class Unpublished:
    """The publisher ended its publication (FCUnpublish, deleteStream or closeStream)."""


FailKind = Literal["protocol", "unsupported", "limit"]


@dataclass(frozen=True)
class Failed:
    """The connection must close: a protocol violation, an unsupported codec or a limit."""

    kind: FailKind
    reason: str


Event = Connected | PublishRequested | TracksReady | Frame | Unpublished | Failed


_ERRORS: dict[FailKind, type[PeerdError]] = {
    "protocol": BadRequest,
    "unsupported": MediaError,
    "limit": TooManyRequests,
}


def _fail(kind: FailKind, reason: str) -> NoReturn:
    """Unwind receive() to a :class:`Failed` event (the class carries the kind)."""
    raise _ERRORS[kind](reason)


def _kind(e: PeerdError) -> FailKind:
    if isinstance(e, MediaError):
        return "unsupported"
    if isinstance(e, TooManyRequests):
        return "limit"
    return "protocol"


# -- AMF0 ---------------------------------------------------------------------------------------


def decode_amf0(data: bytes, *, max_depth: int = MAX_AMF_DEPTH) -> list[Any]:
    """Every AMF0 value in ``data``, in order.

    Numbers and dates become float, booleans bool, strings str (UTF-8, invalid bytes replaced),
    objects and ECMA arrays dict, strict arrays list, null/undefined/unsupported None.
    Raises :class:`~peerd.BadRequest` on truncated or malformed input or nesting deeper
    than ``max_depth``."""
    reader = _AmfReader(data, max_depth)
    values = []
    while reader.pos < len(data):
        values.append(reader.value(0))
    return values


class _AmfReader:
    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            _fail("protocol", "truncated AMF0 value")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self, n: int) -> str:
        return self.take(n).decode("utf-8", "replace")

    def pairs(self, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            key = self.string(self.u16())
            if key == "" and self.pos < len(self.data) and self.data[self.pos] == 9:
                self.pos += 1
                return out
            out[key] = self.value(depth + 1)

    def value(self, depth: int) -> Any:
        if depth > self.max_depth:
            _fail("limit", f"AMF0 values nested deeper than {self.max_depth}")
        marker = self.take(1)[0]
        if marker == 0:
            return struct.unpack(">d", self.take(8))[0]
        if marker == 1:
            return self.take(1)[0] != 0
        if marker == 2:
            return self.string(self.u16())
        if marker == 3:
            return self.pairs(depth)
        if marker in (5, 6, 13):  # null, undefined, unsupported
            return None
        if marker == 8:
            self.u32()  # the count is only a hint; the end marker ends it
            return self.pairs(depth)
        if marker == 10:
            count = self.u32()
            if count > len(self.data) - self.pos:  # every value takes at least a byte
                _fail("protocol", "AMF0 strict array longer than its message")
            return [self.value(depth + 1) for _ in range(count)]
        if marker == 11:
            ms = struct.unpack(">d", self.take(8))[0]
            self.take(2)  # time zone, unused by the format's own rules
            return ms
        if marker == 12:
            return self.string(self.u32())
        _fail("protocol", f"AMF0 type marker {marker} not understood")


def encode_amf0(*values: Any) -> bytes:
    """AMF0 encoding of ``values``: float/int number, bool boolean, str string (long string past
    65535 bytes), Mapping object, list/tuple strict array, None null."""
    out = bytearray()
    for v in values:
        _encode(out, v)
    return bytes(out)


def _encode(out: bytearray, v: Any) -> None:
    if isinstance(v, bool):
        out += bytes((1, int(v)))
    elif isinstance(v, int | float):
        out += b"\x00" + struct.pack(">d", float(v))
    elif isinstance(v, str):
        raw = v.encode()
        if len(raw) > 0xFFFF:
            out += b"\x0c" + len(raw).to_bytes(4, "big") + raw
        else:
            out += b"\x02" + len(raw).to_bytes(2, "big") + raw
    elif isinstance(v, Mapping):
        out += b"\x03"
        for key, item in v.items():
            raw = str(key).encode()
            out += len(raw).to_bytes(2, "big") + raw
            _encode(out, item)
        out += b"\x00\x00\x09"
    elif isinstance(v, list | tuple):
        out += b"\x0a" + len(v).to_bytes(4, "big")
        for item in v:
            _encode(out, item)
    elif v is None:
        out += b"\x05"
    else:
        raise TypeError(f"no AMF0 encoding for {type(v).__name__}")


# -- chunk stream ------------------------------------------------------------------------------


@dataclass
class _ChunkStream:
    """What the previous header of one chunk stream said, and the message being assembled."""

    timestamp: int = 0  # of the current/last message, mod 2**32
    ts_field: int = 0  # the last header's timestamp field (absolute after fmt 0, else a delta)
    extended: bool = False  # the last header's field was 0xFFFFFF
    length: int = 0
    type_id: int = 0
    stream_id: int = 0
    partial: bytearray | None = None  # the message in progress


@dataclass
class _Publication:
    """Per-publication media state: headers, tracks and the timestamp base."""

    key: str
    stream_id: int
    expected: set[Kind] | None = None
    headers: dict[Kind, bytes] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    tracks: dict[Kind, LiveTrack] | None = None
    nal_length: int = 4
    last_ts: int | None = None  # the previous message's 32-bit timestamp
    ext_ts: int = 0  # the same, unwrapped
    base: int | None = None
    dropped: int = 0


class RtmpConnection:
    """The server side of one RTMP connection (see the module docstring)."""

    def __init__(
        self,
        *,
        nonce: bytes = b"",
        max_message: int = MAX_MESSAGE,
        max_chunk_streams: int = MAX_CHUNK_STREAMS,
        max_amf_depth: int = MAX_AMF_DEPTH,
    ) -> None:
        """``nonce``: the random part of S1 (the adapter passes random bytes; zeros if short)."""
        self.state = State.HANDSHAKE
        self.app = ""
        self.max_message = max_message
        self.max_chunk_streams = max_chunk_streams
        self.max_amf_depth = max_amf_depth
        self._nonce = (nonce + bytes(HANDSHAKE_SIZE))[: HANDSHAKE_SIZE - 8]
        self._buf = bytearray()
        self._pos = 0
        self._out = bytearray()
        self._hs_sent = False
        self._in_chunk = 128
        self._out_chunk = 128
        self._streams: dict[int, _ChunkStream] = {}
        self._pending = 0  # declared bytes of partial messages
        self._received = 0
        self._peer_window = 0
        self._acked = 0
        self._next_stream_id = 1
        self._pub: _Publication | None = None
        self._events: list[Event] = []

    @property
    def closed(self) -> bool:
        """True once the connection should be closed (after writing :meth:`data_to_send`)."""
        return self.state is State.CLOSED

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer, now; empties the outgoing buffer."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(self, data: bytes) -> list[Event]:
        """Take bytes read from the peer; return what happened (never raises)."""
        if self.state is State.CLOSED:
            return []
        self._events = []
        self._received += len(data)
        self._buf += data
        try:
            if self.state is State.HANDSHAKE:
                self._handshake()
            if self.state is not State.HANDSHAKE:
                self._chunks()
            if self._peer_window and self._received - self._acked >= self._peer_window:
                self._acked = self._received
                self._send(_CONTROL_CSID, ACK, 0, (self._received & 0xFFFFFFFF).to_bytes(4, "big"))
        except (BadRequest, TooManyRequests) as e:
            self._events.append(Failed(_kind(e), str(e)))
            self.state = State.CLOSED
        except (ValueError, IndexError, struct.error) as e:  # a parser slip is still a violation
            self._events.append(Failed("protocol", f"malformed input ({e})"))
            self.state = State.CLOSED
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        return self._events

    def accept(self) -> None:
        """Accept the pending publish: onStatus NetStream.Publish.Start; frames follow."""
        if self.state is not State.PUBLISH_PENDING or self._pub is None:
            return
        sid = self._pub.stream_id
        self._send(_CONTROL_CSID, USER_CONTROL, 0, b"\x00\x00" + sid.to_bytes(4, "big"))
        self._status(sid, "status", "NetStream.Publish.Start", f"{self.app} is now published")
        self.state = State.PUBLISHING

    def reject(self, code: str, description: str) -> None:
        """Refuse the pending publish with an onStatus error (e.g. NetStream.Publish.BadName);
        the connection is then closed."""
        sid = self._pub.stream_id if self._pub is not None else 0
        self._status(sid, "error", code, description)
        self._pub = None
        self.state = State.CLOSED

    # -- handshake ------------------------------------------------------------------------------

    def _handshake(self) -> None:
        avail = len(self._buf) - self._pos
        if not self._hs_sent:
            if avail >= 1 and self._buf[self._pos] != RTMP_VERSION:
                version = self._buf[self._pos]
                _fail(
                    "unsupported",
                    f"RTMP version {version} (RTMPE/RTMPT are not offered; use plain RTMP or "
                    "RTMPS)",
                )
            if avail < 1 + HANDSHAKE_SIZE:
                return
            c1 = bytes(self._buf[self._pos + 1 : self._pos + 1 + HANDSHAKE_SIZE])
            self._pos += 1 + HANDSHAKE_SIZE
            s1 = bytes(8) + self._nonce
            self._out += bytes((RTMP_VERSION,)) + s1 + c1
            self._hs_sent = True
            avail -= 1 + HANDSHAKE_SIZE
        if avail >= HANDSHAKE_SIZE:
            self._pos += HANDSHAKE_SIZE  # C2: an echo of S1 we need not check
            self.state = State.CONNECTING

    # -- chunks ----------------------------------------------------------------------------------

    def _chunks(self) -> None:
        buf = self._buf
        while self.state is not State.CLOSED:
            pos = self._pos
            end = len(buf)
            if pos >= end:
                return
            b0 = buf[pos]
            fmt = b0 >> 6
            csid = b0 & 0x3F
            p = pos + 1
            if csid == 0:
                if end < p + 1:
                    return
                csid = 64 + buf[p]
                p += 1
            elif csid == 1:
                if end < p + 2:
                    return
                csid = 64 + buf[p] + (buf[p + 1] << 8)
                p += 2
            mh = (11, 7, 3, 0)[fmt]
            if end < p + mh:
                return
            cs = self._streams.get(csid)
            if cs is None:
                if fmt != 0:
                    _fail("protocol", f"chunk stream {csid} starts with format {fmt}")
                if len(self._streams) >= self.max_chunk_streams:
                    _fail("limit", f"more than {self.max_chunk_streams} chunk streams")
            ts_field = int.from_bytes(buf[p : p + 3], "big") if fmt < 3 else 0
            length = int.from_bytes(buf[p + 3 : p + 6], "big") if fmt < 2 else 0
            type_id = buf[p + 6] if fmt < 2 else 0
            msid = int.from_bytes(buf[p + 7 : p + 11], "little") if fmt == 0 else 0
            p += mh
            extended = ts_field == 0xFFFFFF if fmt < 3 else cs is not None and cs.extended
            ext_value = 0
            if extended:
                if end < p + 4:
                    return
                ext_value = int.from_bytes(buf[p : p + 4], "big")
                p += 4
            continuing = cs is not None and cs.partial is not None
            if continuing and fmt != 3:
                _fail("protocol", f"chunk stream {csid}: new header inside a message")
            if continuing:
                assert cs is not None
                assert cs.partial is not None
                remaining = cs.length - len(cs.partial)
            else:
                if fmt == 0:
                    remaining = length
                elif fmt == 1:
                    remaining = length
                else:
                    assert cs is not None
                    remaining = cs.length
                if remaining > self.max_message:
                    _fail("limit", f"message of {remaining} bytes (limit {self.max_message})")
                if self._pending + remaining > 2 * self.max_message:
                    _fail("limit", "too many bytes in partial messages")
            take = min(remaining, self._in_chunk)
            if end < p + take:
                return
            # The chunk is whole: commit it.
            payload = bytes(buf[p : p + take])
            self._pos = p + take
            if cs is None:
                cs = self._streams[csid] = _ChunkStream()
            if not continuing:
                if fmt < 3:
                    field_value = ext_value if extended else ts_field
                    cs.ts_field = field_value
                    cs.extended = extended
                    cs.timestamp = (
                        field_value if fmt == 0 else (cs.timestamp + field_value) & 0xFFFFFFFF
                    )
                else:
                    delta = ext_value if extended else cs.ts_field
                    cs.timestamp = (cs.timestamp + delta) & 0xFFFFFFFF
                if fmt < 2:
                    cs.length = length
                    cs.type_id = type_id
                if fmt == 0:
                    cs.stream_id = msid
                cs.partial = bytearray()
                self._pending += cs.length
            assert cs.partial is not None
            cs.partial += payload
            if len(cs.partial) >= cs.length:
                message = bytes(cs.partial)
                cs.partial = None
                self._pending -= cs.length
                self._message(cs.type_id, cs.stream_id, cs.timestamp, message)

    # -- messages --------------------------------------------------------------------------------

    def _message(self, type_id: int, stream_id: int, timestamp: int, body: bytes) -> None:
        if type_id == SET_CHUNK_SIZE:
            size = self._u32(body, "Set Chunk Size") & 0x7FFFFFFF
            if size < 1:
                _fail("protocol", "chunk size 0")
            if size > self.max_message:
                _fail("limit", f"chunk size {size} above {self.max_message}")
            self._in_chunk = size
        elif type_id == ABORT:
            cs = self._streams.get(self._u32(body, "Abort"))
            if cs is not None and cs.partial is not None:
                self._pending -= cs.length
                cs.partial = None
        elif type_id == WINDOW_ACK:
            self._peer_window = self._u32(body, "Window Acknowledgement Size")
        elif type_id == USER_CONTROL:
            if len(body) >= 6 and body[:2] == b"\x00\x06":  # PingRequest -> PingResponse
                self._send(_CONTROL_CSID, USER_CONTROL, 0, b"\x00\x07" + body[2:6])
        elif type_id in (COMMAND_AMF0, COMMAND_AMF3):
            amf = body[1:] if type_id == COMMAND_AMF3 else body
            self._command(stream_id, decode_amf0(amf, max_depth=self.max_amf_depth))
        elif type_id in (DATA_AMF0, DATA_AMF3):
            amf = body[1:] if type_id == DATA_AMF3 else body
            self._data(decode_amf0(amf, max_depth=self.max_amf_depth))
        elif type_id in (AUDIO, VIDEO):
            if self.state is State.PUBLISHING and self._pub is not None and body:
                if type_id == VIDEO:
                    self._video(self._pub, timestamp, body)
                else:
                    self._audio(self._pub, timestamp, body)
        # ACK, SET_PEER_BANDWIDTH, shared objects, aggregates: nothing a publisher needs from us.

    @staticmethod
    def _u32(body: bytes, what: str) -> int:
        if len(body) < 4:
            _fail("protocol", f"{what} message shorter than 4 bytes")
        return int.from_bytes(body[:4], "big")

    def _command(self, stream_id: int, values: list[Any]) -> None:
        if not values or not isinstance(values[0], str):
            _fail("protocol", "command without a name")
        name = values[0]
        txn = values[1] if len(values) > 1 and isinstance(values[1], float) else 0.0
        args = values[2:]
        if name == "connect":
            if self.state is not State.CONNECTING:
                _fail("protocol", "connect sent twice")
            obj = args[0] if args and isinstance(args[0], dict) else {}
            app = obj.get("app")
            self.app = app if isinstance(app, str) else ""
            self._send(_CONTROL_CSID, WINDOW_ACK, 0, WINDOW_ACK_SIZE.to_bytes(4, "big"))
            self._send(
                _CONTROL_CSID, SET_PEER_BANDWIDTH, 0, WINDOW_ACK_SIZE.to_bytes(4, "big") + b"\x02"
            )
            self._send(_CONTROL_CSID, SET_CHUNK_SIZE, 0, OUT_CHUNK_SIZE.to_bytes(4, "big"))
            self._out_chunk = OUT_CHUNK_SIZE
            self._invoke(
                0,
                "_result",
                txn,
                {"fmsVer": "FMS/3,0,1,123", "capabilities": 31},
                {
                    "level": "status",
                    "code": "NetConnection.Connect.Success",
                    "description": "Connection succeeded.",
                    "objectEncoding": 0,
                },
            )
            self.state = State.CONNECTED
            self._events.append(Connected(self.app))
            return
        if self.state is State.CONNECTING:
            _fail("protocol", f"command {name!r} before connect")
        if name == "releaseStream":
            self._invoke(0, "_result", txn, None)
        elif name == "FCPublish":
            stream = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            self._invoke(
                0,
                "onFCPublish",
                0.0,
                None,
                {"code": "NetStream.Publish.Start", "description": stream.split("?", 1)[0]},
            )
        elif name == "createStream":
            if self._next_stream_id > MAX_STREAMS:
                _fail("limit", f"more than {MAX_STREAMS} createStream calls")
            sid = self._next_stream_id
            self._next_stream_id += 1
            self._invoke(0, "_result", txn, None, float(sid))
        elif name == "publish":
            if self.state is not State.CONNECTED:
                _fail("protocol", "publish while already publishing")
            raw = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            key = raw.split("?", 1)[0]
            self._pub = _Publication(key=key, stream_id=stream_id)
            self.state = State.PUBLISH_PENDING
            self._events.append(PublishRequested(key=key, app=self.app))
        elif name in ("FCUnpublish", "deleteStream", "closeStream"):
            if self.state in (State.PUBLISHING, State.PUBLISH_PENDING):
                self._pub = None
                self.state = State.CONNECTED
                self._events.append(Unpublished())
        elif name in ("play", "play2"):
            self._status(stream_id, "error", "NetStream.Play.Failed", "this node takes publishers")
            _fail("unsupported", "play: this node only takes publishers over RTMP")
        # Anything else (_checkbw, getStreamLength, setDataFrame as a command...) is not needed.

    def _data(self, values: list[Any]) -> None:
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        if len(values) < 2 or values[0] != "onMetaData" or not isinstance(values[1], dict):
            return
        pub = self._pub
        if pub is None or pub.tracks is not None:
            return
        pub.meta = values[1]
        kinds: set[Kind] = set()
        if pub.meta.get("videocodecid") not in (None, 0.0, False, ""):
            kinds.add("video")
        if pub.meta.get("audiocodecid") not in (None, False, ""):
            kinds.add("audio")
        pub.expected = kinds
        self._maybe_ready(pub)

    # -- media -----------------------------------------------------------------------------------

    def _video(self, pub: _Publication, timestamp: int, body: bytes) -> None:
        b0 = body[0]
        if b0 & 0x80:  # Enhanced RTMP: IsExHeader, then a FourCC
            fourcc = body[1:5].decode("ascii", "replace")
            _fail(
                "unsupported",
                f"video codec {fourcc!r} (Enhanced RTMP) is not supported; publish H.264",
            )
        frame_type, codec = b0 >> 4, b0 & 0x0F
        if frame_type == 5:  # video info/command frame, no picture
            return
        if codec != 7:
            name = _VIDEO_CODECS.get(codec, f"id {codec}")
            _fail("unsupported", f"video codec {name} is not supported; publish H.264")
        if len(body) < 5:
            _fail("protocol", "AVC video message shorter than 5 bytes")
        packet_type = body[1]
        if packet_type == 0:
            config = body[5:]
            if len(config) < 7 or config[0] != 1:
                _fail("protocol", "malformed AVCDecoderConfigurationRecord")
            self._header(pub, "video", config)
        elif packet_type == 1:
            cts = int.from_bytes(body[2:5], "big", signed=True)
            data = body[5:]
            track = self._track(pub, "video")
            if track is None:
                return
            if pub.nal_length != 4:
                data = _relength(data, pub.nal_length)
            self._emit(pub, track, timestamp, cts, frame_type == 1, data)
        # 2: end of sequence: the publication's end comes with FCUnpublish/deleteStream.

    def _audio(self, pub: _Publication, timestamp: int, body: bytes) -> None:
        fmt = body[0] >> 4
        if fmt == 9:  # Enhanced RTMP audio: ExHeader, then a FourCC
            fourcc = body[1:5].decode("ascii", "replace")
            _fail(
                "unsupported",
                f"audio codec {fourcc!r} (Enhanced RTMP) is not supported; publish AAC",
            )
        if fmt != 10:
            name = _AUDIO_CODECS.get(fmt, f"id {fmt}")
            _fail("unsupported", f"audio codec {name} is not supported; publish AAC")
        if len(body) < 2:
            _fail("protocol", "AAC audio message shorter than 2 bytes")
        if body[1] == 0:
            config = body[2:]
            if len(config) < 2:
                _fail("protocol", "AudioSpecificConfig shorter than 2 bytes")
            self._header(pub, "audio", config)
        elif body[1] == 1:
            track = self._track(pub, "audio")
            if track is not None:
                self._emit(pub, track, timestamp, 0, True, body[2:])

    def _header(self, pub: _Publication, kind: Kind, config: bytes) -> None:
        if pub.tracks is None:
            pub.headers[kind] = config
            self._maybe_ready(pub)
            return
        track = pub.tracks.get(kind)
        if track is not None and track.config != _normalised(kind, config):
            _fail("unsupported", f"{kind} configuration changed during the publication")

    def _maybe_ready(self, pub: _Publication) -> None:
        if pub.tracks is None and pub.expected and pub.expected <= pub.headers.keys():
            self._ready(pub)

    def _track(self, pub: _Publication, kind: Kind) -> LiveTrack | None:
        if pub.tracks is None:
            self._ready(pub)
        assert pub.tracks is not None
        track = pub.tracks.get(kind)
        if track is None:
            pub.dropped += 1
        return track

    def _ready(self, pub: _Publication) -> None:
        if not pub.headers:
            _fail(
                "protocol",
                "media before any sequence header (H.264 avcC / AAC AudioSpecificConfig)",
            )
        tracks: dict[Kind, LiveTrack] = {}
        meta = pub.meta
        avcc = pub.headers.get("video")
        if avcc is not None:
            pub.nal_length = (avcc[4] & 0x03) + 1
            if pub.nal_length == 3:
                _fail("unsupported", "H.264 with 3-byte NAL lengths")
            tracks["video"] = LiveTrack(
                index=len(tracks),
                kind="video",
                codec="h264",
                timescale=1000,
                config=_normalised("video", avcc),
                width=_int(meta.get("width")),
                height=_int(meta.get("height")),
            )
        asc = pub.headers.get("audio")
        if asc is not None:
            rate, channels = _asc_info(asc)
            tracks["audio"] = LiveTrack(
                index=len(tracks),
                kind="audio",
                codec="aac",
                timescale=1000,
                config=asc,
                sample_rate=rate,
                channels=channels,
            )
        pub.tracks = tracks
        self._events.append(TracksReady(tuple(tracks.values())))

    def _emit(
        self, pub: _Publication, track: LiveTrack, ts: int, cts: int, key: bool, data: bytes
    ) -> None:
        if pub.last_ts is None:
            pub.ext_ts = ts
        else:
            diff = (ts - pub.last_ts) & 0xFFFFFFFF
            pub.ext_ts += diff - (1 << 32) if diff >= 1 << 31 else diff
        pub.last_ts = ts
        if pub.base is None:
            pub.base = pub.ext_ts
        dts = pub.ext_ts - pub.base
        frame = LiveFrame(track=track.index, dts=dts, pts=dts + cts, keyframe=key, data=data)
        self._events.append(Frame(frame))

    # -- sending ---------------------------------------------------------------------------------

    def _send(self, csid: int, type_id: int, stream_id: int, body: bytes) -> None:
        """One message, format 0 then format 3 continuations, at the current chunk size."""
        size = self._out_chunk
        header = bytes((csid,)) + bytes(3) + len(body).to_bytes(3, "big") + bytes((type_id,))
        self._out += header + stream_id.to_bytes(4, "little") + body[:size]
        for off in range(size, len(body), size):
            self._out += bytes((0xC0 | csid,)) + body[off : off + size]

    def _invoke(self, stream_id: int, *values: Any) -> None:
        self._send(_COMMAND_CSID, COMMAND_AMF0, stream_id, encode_amf0(*values))

    def _status(self, stream_id: int, level: str, code: str, description: str) -> None:
        info = {"level": level, "code": code, "description": description}
        self._send(5, COMMAND_AMF0, stream_id, encode_amf0("onStatus", 0.0, None, info))


def _normalised(kind: Kind, config: bytes) -> bytes:
    """The track config as :class:`LiveTrack` carries it: an avcC says 4-byte NAL lengths."""
    if kind == "video" and len(config) > 4:
        return config[:4] + bytes((config[4] | 0x03,)) + config[5:]
    return config


def _relength(data: bytes, size: int) -> bytes:
    """NAL units prefixed with ``size``-byte lengths, rewritten with 4-byte lengths."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        if pos + size > len(data):
            _fail("protocol", "truncated NAL unit length")
        n = int.from_bytes(data[pos : pos + size], "big")
        pos += size
        if pos + n > len(data):
            _fail("protocol", "NAL unit longer than its message")
        out += n.to_bytes(4, "big") + data[pos : pos + n]
        pos += n
    return bytes(out)


def _asc_info(asc: bytes) -> tuple[int, int]:
    """Sample rate and channel count of an AudioSpecificConfig (0 where it does not say)."""
    bits = int.from_bytes(asc[:5].ljust(5, b"\x00"), "big")  # 40 bits, enough for the fields
    obj = bits >> 35
    shift = 35
    if obj == 31:
        shift -= 6
    index = (bits >> (shift - 4)) & 0x0F
    shift -= 4
    if index == 15:
        rate = (bits >> (shift - 24)) & 0xFFFFFF
        shift -= 24
    else:
        rate = _AAC_RATES[index] if index < len(_AAC_RATES) else 0
    channels = (bits >> (shift - 4)) & 0x0F
    return rate, channels


def _int(v: object) -> int:
    """A metadata number as an int (0 when absent or not a number)."""
    return int(v) if isinstance(v, float) and 0 <= v < 1 << 31 else 0
