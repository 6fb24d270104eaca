"""The libp2p host, living entirely in the trio thread (see :mod:`peerd.p2p.bridge`).

Everything here runs under trio; the asyncio side calls in through ``TrioThread.call`` and gets
plain values or opaque stream handles back. libp2p is imported lazily, inside the thread, because
``import libp2p`` costs ~1.3 s and ~80 MiB and is not needed by nodes with p2p turned off.

Host: TCP and WebSocket listeners on separate ports, Noise as the only security transport (no
plaintext, no secio, no TLS fallback), yamux as the only muxer, identify and ping (libp2p's
defaults), Kad-DHT (``/ipfs/kad/1.0.0``) in server or client mode, connection caps for home
routers, and the blob protocol (:mod:`peerd.core.blobwire`) with its full-copy question
(``/peerd/held/1.0.0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import threading
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from peerd.config import P2PSettings
from peerd.core import blobwire
from peerd.core.blobwire import Status
from peerd.errors import UpstreamError
from peerd.p2p.bridge import TrioThread, to_asyncio

log = logging.getLogger("peerd.p2p")

CHUNK = 256 * 1024
ADDR_TTL_S = 3600
REQUEST_TIMEOUT_S = 10.0

# Looks a blob up in the local store from trio; returns its path, the bytes of a manifest
# (asked for by its media id), or None.
LocalLookup = Callable[[str], Coroutine[Any, Any, Path | bytes | None]]
# Whether this node holds every blob of a media id (``/peerd/held/1.0.0``), from trio.
HeldLookup = Callable[[str], Coroutine[Any, Any, bool]]


@dataclass
class Counters:
    """What the node did, read by the asyncio side for metrics."""

    served_bytes: int = 0
    refused_busy: int = 0
    # DHT messages a peer did not get (announcements, lookups), by reason (see _Unreachable).
    provide_failures: dict[str, int] = field(default_factory=dict)


class _PeerCount:
    """A libp2p notifee that keeps :attr:`TrioNode.peers` equal to the connected peers, and
    forgets a peer when its last connection closes (:meth:`TrioNode.forget`).

    The swarm adds a connection to its records before it notifies ``connected`` and removes
    it before ``disconnected``, so counting then is exact. Every method of the notifee
    interface is defined: the swarm calls them all.
    """

    def __init__(self, node: TrioNode, host: Any) -> None:
        self.node = node
        self.host = host

    def _count(self) -> None:
        self.node.peers = len(self.host.get_connected_peers())

    async def connected(self, network: Any, conn: Any) -> None:
        """A connection was added."""
        self._count()

    async def disconnected(self, network: Any, conn: Any) -> None:
        """A connection was removed."""
        self._count()
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self.node.forget(peer)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        """Not counted."""

    async def closed_stream(self, network: Any, stream: Any) -> None:
        """Not counted."""

    async def listen(self, network: Any, multiaddr: Any) -> None:
        """Not counted."""

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        """Not counted."""


class _Unreachable(logging.Filter):
    """Turns py-libp2p's warnings about a DHT peer it could not reach into counted debug lines.

    The Kad-DHT logs a warning for every announcement or lookup message a peer does not get;
    with a departed peer still known, that was thousands of lines an hour. Peers that leave are
    forgotten (:meth:`TrioNode.forget`), but a peer that leaves during a round still fails
    once: that is routine, so it is counted in :attr:`Counters.provide_failures` (reason
    ``unreachable`` when no connection could be made, ``error`` when the exchange broke) and
    logged at debug. Only records of this node's trio thread are touched.
    """

    LOGGERS = ("libp2p.kad_dht.provider_store", "libp2p.kad_dht.peer_routing")
    COUNTED = ("Error sending ADD_PROVIDER to ", "Failed to open stream to ")
    # The provide loop logs its own failure again under this name: demoted, not counted twice.
    REPEATED = "Failed to send ADD_PROVIDER to "
    GONE = ("unable to connect", "negative cache", "failed all addresses", "no addresses")

    def __init__(self, counters: Counters, thread: int) -> None:
        super().__init__()
        self.counters = counters
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote (and count) a failure to reach a peer; pass anything else as it is."""
        if record.thread != self.thread or record.levelno != logging.WARNING:
            return True
        msg = str(record.msg)
        if msg.startswith(self.COUNTED):
            reason = "unreachable" if any(g in msg for g in self.GONE) else "error"
            failures = self.counters.provide_failures
            failures[reason] = failures.get(reason, 0) + 1
        elif not msg.startswith(self.REPEATED):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class TrioNode:
    """The libp2p host and DHT. Construct anywhere; call its coroutines only in trio."""

    def __init__(
        self,
        cfg: P2PSettings,
        seed: bytes,
        lookup: LocalLookup,
        loop: asyncio.AbstractEventLoop,
        bridge: TrioThread,
        held: HeldLookup | None = None,
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.lookup = lookup
        self.held = held
        self.loop = loop
        self.bridge = bridge
        self.host: Any = None
        self.dht: Any = None
        self.counters = Counters()
        self._serving = 0
        self.draining = False  # set from asyncio on SIGTERM: new blob requests get BUSY
        # Connected peers, kept current by the network's events (_PeerCount); read from
        # asyncio without a hop to this thread (the resolver's "idle" hint, Libp2pSource).
        self.peers = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Start the host in the bridge's root nursery; returns the listen multiaddrs."""
        addrs: list[str] = await self.bridge.nursery.start(self._serve)
        return addrs

    async def _serve(self, task_status: Any) -> None:
        _restore_logging()
        unreachable = _Unreachable(self.counters, threading.get_ident())
        for name in _Unreachable.LOGGERS:
            logging.getLogger(name).addFilter(unreachable)
        try:
            await self._run_host(task_status)
        finally:
            for name in _Unreachable.LOGGERS:
                logging.getLogger(name).removeFilter(unreachable)

    async def _run_host(self, task_status: Any) -> None:
        import multiaddr  # noqa: PLC0415 - lazy: see the module doc
        from libp2p import create_yamux_muxer_option, new_host  # noqa: PLC0415
        from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: PLC0415
        from libp2p.crypto.x25519 import create_new_key_pair as new_x25519  # noqa: PLC0415
        from libp2p.custom_types import TProtocol  # noqa: PLC0415
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT  # noqa: PLC0415
        from libp2p.network.config import ConnectionConfig  # noqa: PLC0415
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID  # noqa: PLC0415
        from libp2p.security.noise.transport import Transport as Noise  # noqa: PLC0415
        from libp2p.tools.anyio_service import background_trio_service  # noqa: PLC0415

        cfg = self.cfg
        if cfg.tcp_port and cfg.tcp_port == cfg.ws_port:
            raise UpstreamError("p2p.tcp_port and p2p.ws_port must differ")
        kp = create_new_key_pair(self.seed)
        # Port 0 is resolved here: libp2p reports both listeners on the TCP port when both ask
        # for an ephemeral port, and TCP and WebSocket must listen on separate ports.
        tcp_port = cfg.tcp_port or _free_port(cfg.host)
        ws_port = cfg.ws_port or _free_port(cfg.host, avoid=tcp_port)
        listen = [
            multiaddr.Multiaddr(f"/ip4/{cfg.host}/tcp/{tcp_port}"),
            multiaddr.Multiaddr(f"/ip4/{cfg.host}/tcp/{ws_port}/ws"),
        ]
        high = max(1, cfg.max_connections * 3 // 4)
        host = new_host(
            key_pair=kp,
            # Noise only: a default host would also accept plaintext and secio.
            sec_opt={NOISE_ID: Noise(kp, noise_privkey=new_x25519().private_key)},
            muxer_opt=create_yamux_muxer_option(),
            listen_addrs=listen,
            announce_addrs=[multiaddr.Multiaddr(a) for a in cfg.announce_addrs] or None,
            connection_config=ConnectionConfig(
                max_connections=cfg.max_connections,
                max_connections_per_peer=cfg.max_connections_per_peer,
                min_connections=0,
                low_watermark=0,
                high_watermark=high,
            ),
            enable_mDNS=False,  # peerd advertises _p2p._udp itself (peerd.discovery)
        )
        mode = DHTMode.CLIENT if cfg.dht_mode == "client" else DHTMode.SERVER
        async with host.run(listen):
            # No background dialling of every address in the peerstore to reach a watermark:
            # peerd dials bootstrap peers, LAN peers and providers when it needs them, which
            # keeps the connection count (and a home router's NAT table) small.
            swarm: Any = host.get_network()
            await swarm.auto_connector.stop()
            swarm.register_notifee(_PeerCount(self, host))
            host.set_stream_handler(TProtocol(blobwire.PROTOCOL_ID), self._handle_blob)
            if self.held is not None:
                host.set_stream_handler(TProtocol(blobwire.HELD_PROTOCOL_ID), self._handle_held)
            dht = KadDHT(host, mode)
            async with background_trio_service(dht):
                self.host, self.dht = host, dht
                for addr in cfg.bootstrap:
                    await self.connect_addr(addr)
                task_status.started([str(a) for a in host.get_addrs()])
                try:
                    await trio.sleep_forever()
                finally:
                    self.host = self.dht = None
                    self.peers = 0
                    # Close every connection before the run contexts unwind: left to them,
                    # py-libp2p 0.8.1 drops some dialled sockets without closing them.
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await host.close()
        _collect_dropped_sockets()

    def _require(self) -> tuple[Any, Any]:
        if self.host is None or self.dht is None:
            raise UpstreamError("libp2p host is not running")
        return self.host, self.dht

    # -- peers ---------------------------------------------------------------------------------

    async def connect_addr(self, addr: str) -> str | None:
        """Dial a ``/.../p2p/<id>`` multiaddr and add the peer to the DHT routing table."""
        import multiaddr  # noqa: PLC0415
        from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: PLC0415

        host, dht = self._require()
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            if info.peer_id == host.get_id():
                return None
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await host.connect(info)
                await dht.add_peer(info.peer_id)
        except Exception as exc:
            log.info("cannot reach libp2p peer", extra={"addr": addr, "error": repr(exc)})
            return None
        return str(info.peer_id)

    def forget(self, peer: Any) -> None:
        """Drop a peer whose last connection closed from the DHT routing table and the peer
        store, so announcements and lookups stop dialling a node that left. A peer that is
        still there comes back when it connects again (it dials us, or discovery or a DHT
        answer names it)."""
        from libp2p.peer.peerstore import PeerStoreError  # noqa: PLC0415

        if self.dht is not None:
            self.dht.routing_table.remove_peer(peer)
        if self.host is not None:
            with contextlib.suppress(PeerStoreError):
                self.host.get_peerstore().clear_peerdata(peer)
        log.debug("libp2p peer left, forgotten", extra={"peer": str(peer)})

    async def addrs(self) -> list[str]:
        """The host's current multiaddrs (with /p2p/<id>)."""
        host, _ = self._require()
        return [str(a) for a in host.get_addrs()]

    @property
    def serving(self) -> int:
        """Blob transfers to other peers in progress."""
        return self._serving

    async def connected(self) -> int:
        """How many peers are connected."""
        host, _ = self._require()
        return len(host.get_connected_peers())

    async def ping(self, addr: str) -> float:
        """Round trip in ms to a ``/p2p/`` multiaddr with the libp2p ping protocol."""
        import multiaddr  # noqa: PLC0415
        from libp2p.host.ping import PingService  # noqa: PLC0415
        from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: PLC0415

        host, _ = self._require()
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await host.connect(info)
                rtts = await PingService(host).ping(info.peer_id, ping_amt=1)
        except Exception as exc:
            raise UpstreamError(f"ping failed: {exc!r}") from exc
        return float(rtts[0]) / 1000.0

    # -- DHT -----------------------------------------------------------------------------------

    async def provide(self, cids: list[str], concurrency: int) -> list[str]:
        """Announce ``cids`` on the DHT; returns those announced successfully."""
        _, dht = self._require()
        done: list[str] = []
        limit = trio.CapacityLimiter(concurrency)

        async def one(cid: str) -> None:
            async with limit:
                try:
                    if await dht.provide(cid):
                        done.append(cid)
                except Exception as exc:
                    log.debug("provide failed", extra={"cid": cid, "error": repr(exc)})

        async with trio.open_nursery() as n:
            for cid in cids:
                n.start_soon(one, cid)
        return done

    async def find_providers(self, cid: str, count: int) -> list[tuple[str, list[str]]]:
        """Providers of ``cid`` other than this node, without duplicates, as (id, addrs)."""
        host, dht = self._require()
        try:
            infos = await dht.find_providers(cid, count)
        except Exception as exc:
            raise UpstreamError(f"DHT provider lookup failed: {exc!r}") from exc
        me = host.get_id()
        out: dict[str, list[str]] = {}
        for info in infos:
            if info.peer_id == me:
                continue
            addrs = out.setdefault(str(info.peer_id), [])
            addrs.extend(str(a) for a in info.addrs if str(a) not in addrs)
        return list(out.items())

    # -- blob protocol: dialer -----------------------------------------------------------------

    async def _request(
        self, peer: str, addrs: list[str], protocol: str, key: str, what: str
    ) -> tuple[Any, blobwire.Answer]:
        """Open ``protocol`` to ``peer``, send ``key`` and read the answer's header: (stream,
        answer). A failure resets the stream and raises :class:`UpstreamError`."""
        import multiaddr  # noqa: PLC0415
        from libp2p.custom_types import TProtocol  # noqa: PLC0415
        from libp2p.peer.id import ID  # noqa: PLC0415
        from libp2p.peer.peerinfo import PeerInfo  # noqa: PLC0415

        host, _ = self._require()
        stream = None
        try:
            pid = ID.from_base58(peer)
            mas = [multiaddr.Multiaddr(a) for a in addrs]
            with trio.fail_after(REQUEST_TIMEOUT_S):
                if mas:
                    host.get_peerstore().add_addrs(pid, mas, ADDR_TTL_S)
                if pid not in host.get_connected_peers():
                    await host.connect(PeerInfo(pid, mas))
                stream = await host.new_stream(pid, [TProtocol(protocol)])
                await stream.write(blobwire.encode_request(key))
                head = await _read_upto(stream, blobwire.HEADER.size)
            return stream, blobwire.decode_answer(head)
        except Exception as exc:
            if stream is not None:
                await _reset(stream)
            raise UpstreamError(f"libp2p {what} request to {peer} failed: {exc!r}") from exc

    async def open_blob(self, peer: str, addrs: list[str], cid: str) -> tuple[int, int, Any]:
        """Ask ``peer`` for ``cid``: (status, size, stream); the stream is None unless OK."""
        stream, answer = await self._request(peer, addrs, blobwire.PROTOCOL_ID, cid, "blob")
        if answer.status != Status.OK:
            await _reset(stream)
            return int(answer.status), 0, None
        return int(answer.status), answer.size, stream

    async def ask_held(self, peer: str, addrs: list[str], media_id: str) -> bool:
        """Whether ``peer`` holds every blob of ``media_id`` (``/peerd/held/1.0.0``)."""
        stream, answer = await self._request(
            peer, addrs, blobwire.HELD_PROTOCOL_ID, media_id, "held"
        )
        await _reset(stream)
        return answer.status == Status.OK

    async def read(self, stream: Any, n: int) -> bytes:
        """Up to ``n`` bytes of a blob stream (fewer only at the end); b"" at the end."""
        try:
            return await _read_upto(stream, n)
        except Exception as exc:
            await _reset(stream)
            raise UpstreamError(f"libp2p transfer broke: {exc!r}") from exc

    async def close_stream(self, stream: Any) -> None:
        """Release a blob stream."""
        await _reset(stream)

    # -- blob protocol: listener ---------------------------------------------------------------

    async def _handle_blob(self, stream: Any) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                line = await _read_upto(stream, blobwire.MAX_REQUEST, line=True)
            cid = blobwire.decode_request(line)
            if cid is None:
                await stream.write(blobwire.encode_answer(Status.BAD_REQUEST))
                await stream.close()
                return
            if self.draining or self._serving >= self.cfg.max_inbound_transfers:
                self.counters.refused_busy += 1
                await stream.write(blobwire.encode_answer(Status.BUSY))
                await stream.close()
                return
            path = await to_asyncio(self.loop, self.lookup(cid))
            if path is None:
                await stream.write(blobwire.encode_answer(Status.NOT_HELD))
                await stream.close()
                return
            self._serving += 1
            try:
                if isinstance(path, bytes):
                    await stream.write(blobwire.encode_answer(Status.OK, len(path)) + path)
                    self.counters.served_bytes += len(path)
                else:
                    await self._send_file(stream, path)
            finally:
                self._serving -= 1
            await stream.close()
        except Exception as exc:
            log.debug("blob stream ended early", extra={"error": repr(exc)})
            await _reset(stream)

    async def _handle_held(self, stream: Any) -> None:
        assert self.held is not None
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                line = await _read_upto(stream, blobwire.MAX_REQUEST, line=True)
            media_id = blobwire.decode_request(line)
            if media_id is None:
                status = Status.BAD_REQUEST
            else:
                full = await to_asyncio(self.loop, self.held(media_id))
                status = Status.OK if full else Status.NOT_HELD
            await stream.write(blobwire.encode_answer(status))
            await stream.close()
        except Exception as exc:
            log.debug("held stream ended early", extra={"error": repr(exc)})
            await _reset(stream)

    async def _send_file(self, stream: Any, path: Path) -> None:
        async with await trio.open_file(path, "rb") as f:
            size = (await trio.Path(path).stat()).st_size
            await stream.write(blobwire.encode_answer(Status.OK, size))
            sent = 0
            while sent < size:
                chunk = await f.read(min(CHUNK, size - sent))
                if not chunk:
                    raise OSError(f"{path} shrank while being sent")
                await stream.write(chunk)
                sent += len(chunk)
        self.counters.served_bytes += size


async def _read_upto(stream: Any, n: int, *, line: bool = False) -> bytes:
    """Read until ``n`` bytes, end of stream or, with ``line``, a newline at the end of what came
    (libp2p's read_exactly gives up after 100 reads)."""
    from libp2p.network.stream.exceptions import StreamEOF  # noqa: PLC0415

    buf = bytearray()
    while len(buf) < n and not (line and buf.endswith(b"\n")):
        try:
            chunk = await stream.read(n - len(buf))
        except StreamEOF:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def _reset(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception as exc:
        log.debug("stream reset failed", extra={"error": repr(exc)})


def _collect_dropped_sockets() -> None:
    """Close the sockets py-libp2p dropped while its dials were cancelled at shutdown.

    A dial cancelled between TCP connect and the end of the Noise/yamux upgrade leaves its
    socket to the garbage collector, which closes it with a ResourceWarning. Collect them now,
    while stopping, so they are closed at a known moment and not reported as our leak.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _free_port(host: str, avoid: int = 0) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port != avoid:
            return port


def _restore_logging() -> None:
    # ``import libp2p`` turns off propagation of its logger; peerd's JSON handler is on the root.
    # Their debug output (every multiaddr decoded) would drown peerd's own at level debug.
    lib = logging.getLogger("libp2p")
    lib.propagate = True
    if lib.getEffectiveLevel() < logging.INFO:
        lib.setLevel(logging.INFO)
    logging.getLogger("multiaddr").setLevel(logging.WARNING)
