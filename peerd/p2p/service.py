"""The asyncio side of libp2p: the daemon service and the delivery source.

:class:`P2PService` starts the trio thread, builds the host in it (:mod:`peerd.p2p.node`), then
announces held blobs and catalogued media ids (whose manifests it serves as blobs) on the
DHT on the schedule of :class:`peerd.core.provide.ProvideSchedule`
(batched, re-announced every ``p2p.reprovide_interval_s``; lag exported as
``peerd_p2p_provide_lag_seconds``, messages peers did not get as
``peerd_libp2p_provide_failures_total{reason}``; peers that leave are forgotten at once). On
stop it cancels the trio nursery and joins the thread.

:class:`Libp2pSource` finds providers of a blob on the DHT and fetches it over
``/peerd/blob/1.0.0`` from the best of them; providers that refuse are skipped, providers that
fail or lie are reported to the libp2p peer directory and banned by its policy.
:meth:`P2PService.full_copies` asks the providers of a media id which of them hold every blob
of it (``/peerd/held/1.0.0``), for tiering deciding whether the shared bucket's copy may go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from peerd.catalog.media import holds_media, media_count, media_ids, media_manifest
from peerd.core.blobwire import Status
from peerd.core.ids import Cid, parse_cid
from peerd.core.peers import BanPolicy
from peerd.core.provide import ProvideSchedule
from peerd.delivery.source import Offer
from peerd.discovery.directory import PeerDirectory
from peerd.errors import BadRequest, NotFound, PeerdError, UpstreamError
from peerd.p2p.bridge import BridgeClosed, TrioThread
from peerd.p2p.node import TrioNode
from peerd.runtime import Runtime

log = logging.getLogger("peerd.p2p")

READ_SIZE = 1024 * 1024
RESYNC_S = 60.0
REBOOTSTRAP_S = 30.0


class P2PService:
    """libp2p in its own trio thread, plus the DHT provide loop."""

    name = "p2p"

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cfg = rt.settings.p2p
        self.bridge = TrioThread()
        self.node: TrioNode | None = None
        self.addrs: list[str] = []
        self.started = asyncio.Event()
        self.schedule = ProvideSchedule(self.cfg.reprovide_interval_s, self.cfg.provide_batch)
        self.directory = PeerDirectory(
            rt.catalog,
            via="libp2p",
            ttl_s=max(self.cfg.reprovide_interval_s, 3600.0),
            policy=BanPolicy(
                self.cfg.max_failures, self.cfg.ban_failure_s, self.cfg.ban_integrity_s
            ),
        )
        reg = rt.metrics.registry
        self.m_lag = Gauge(
            "peerd_p2p_provide_lag_seconds",
            "How late the most overdue DHT provider announcement is",
            registry=reg,
        )
        self.m_provided = Counter(
            "peerd_p2p_provided", "Blob and media ids announced on the DHT", registry=reg
        )
        self.m_providing = Gauge(
            "peerd_p2p_providing", "Blob and media ids this node announces on the DHT", registry=reg
        )
        self.m_peers = Gauge("peerd_p2p_connected_peers", "Connected libp2p peers", registry=reg)
        self.m_served = Counter(
            "peerd_p2p_served_bytes", "Blob bytes sent to libp2p peers", registry=reg
        )
        self.m_provide_failures = Counter(
            "peerd_libp2p_provide_failures",
            "DHT messages (announcements, lookups) a peer did not get, by reason",
            ["reason"],
            registry=reg,
        )

    async def _lookup(self, cid: str) -> Path | bytes | None:
        try:
            return await self.rt.store.open_path(parse_cid(cid))
        except NotFound:
            # A media id is the CID of its manifest: the manifest is served as that blob.
            return await media_manifest(self.rt.catalog, cid)
        except BadRequest:
            return None

    async def run(self, ready: Callable[[], None]) -> None:
        """Start the thread and host, announce blobs until cancelled, then stop the thread."""
        await self.directory.load()
        loop = asyncio.get_running_loop()
        self.bridge = TrioThread()
        await self.bridge.start()
        try:
            self.node = TrioNode(
                self.cfg,
                self.rt.identity.private_bytes,
                self._lookup,
                loop,
                self.bridge,
                held=lambda media_id: holds_media(self.rt.catalog, media_id),
            )
            self.addrs = await self.bridge.call(self.node.start)
            log.info("libp2p listening", extra={"addrs": self.addrs})
            self.rt.node.libp2p_addrs = list(self.addrs)  # node info for the coordinator API
            await asyncio.to_thread(
                _write_lines, self.rt.settings.state_dir / "p2p.addrs", self.addrs
            )
            self.started.set()
            ready()
            await self._provide_loop()
        finally:
            self.started.clear()
            stopped = await asyncio.shield(self.bridge.stop())
            log.info("libp2p stopped", extra={"thread_joined": stopped})
            await self.directory.flush()

    async def _provide_loop(self) -> None:
        assert self.node is not None
        started = time.time()
        synced_at = -RESYNC_S
        synced_count = (-1, -1)
        served_seen = 0
        failures_seen: dict[str, int] = {}
        rebootstrap_at = time.time()
        while True:
            now = time.time()
            # Media rows land after their blobs (ingest) or without any (a manifest found in
            # the network), so their count is part of what a change looks like.
            counts = (self.rt.store.count, await media_count(self.rt.catalog))
            if self.cfg.provide and (counts != synced_count or now - synced_at >= RESYNC_S):
                held: list[str] = []
                async for batch in self.rt.catalog.iter_present():
                    held.extend(cid for cid, _ in batch)
                # Media ids too: any node can then find a manifest as it finds a blob.
                held.extend(await media_ids(self.rt.catalog))
                self.schedule.sync(held)
                synced_at, synced_count = now, counts
                self.m_providing.set(len(self.schedule))
            connected = await self.bridge.call(self.node.connected)
            if connected == 0 and self.cfg.bootstrap and now - rebootstrap_at >= REBOOTSTRAP_S:
                # Lost every peer (or none answered at start): dial the bootstrap peers again.
                rebootstrap_at = now
                for addr in self.cfg.bootstrap:
                    await self.connect(addr)
                connected = await self.bridge.call(self.node.connected)
            self.m_peers.set(connected)
            due = self.schedule.due(now) if self.cfg.provide else []
            if due and connected == 0:
                # Announcing with no peers only records it locally, and fails for every id: wait
                # for a peer (bootstrap, or one that dials us) rather than spin on failures,
                # which cost a fifth of a core and the HTTP loop's latency (GIL) when idle.
                due = []
            if due:
                done = await self.bridge.call(self.node.provide, due, self.cfg.provide_concurrency)
                self.schedule.done(done, time.time())
                self.schedule.failed(set(due) - set(done), time.time())
                self.m_provided.inc(len(done))
                if len(done) < len(due):
                    log.info(
                        "some provider announcements failed",
                        extra={"due": len(due), "done": len(done)},
                    )
            self.m_lag.set(self.schedule.lag(time.time(), started))
            served = self.node.counters.served_bytes
            self.m_served.inc(served - served_seen)
            self.rt.uplink.sent(served - served_seen, time.monotonic())
            served_seen = served
            for reason, n in list(self.node.counters.provide_failures.items()):
                self.m_provide_failures.labels(reason=reason).inc(n - failures_seen.get(reason, 0))
                failures_seen[reason] = n
            # Go again soon while a backlog remains, otherwise wait one tick.
            backlog = bool(due) and bool(self.schedule.due(time.time()))
            await asyncio.sleep(0.05 if backlog else self.cfg.provide_tick_s)

    async def drain(self, within_s: float = 3.0) -> None:
        """On SIGTERM: refuse new blob requests (BUSY) and let transfers in flight finish for up
        to ``within_s``; the supervisor then cancels :meth:`run`, which stops the thread."""
        node = self.node
        if node is None:
            return
        node.draining = True
        for _ in range(int(within_s / 0.05)):
            if node.serving == 0:
                return
            await asyncio.sleep(0.05)
        log.info("stopping with libp2p transfers in flight", extra={"serving": node.serving})

    async def connect(self, addr: str) -> str | None:
        """Dial a libp2p peer (``/.../p2p/<id>``) and add it to the DHT routing table."""
        if self.node is None or not self.bridge.running:
            return None
        try:
            return await self.bridge.call(self.node.connect_addr, addr)
        except BridgeClosed:
            return None

    async def full_copies(self, media_id: str) -> tuple[set[str], bool]:
        """The providers of ``media_id`` on the DHT that say they hold every blob of it, and
        whether every provider found answered (a failed DHT lookup raises
        :class:`UpstreamError`)."""
        node = self.node
        if node is None or not self.bridge.running:
            return set(), False
        try:
            providers = await self.bridge.call(
                node.find_providers, media_id, self.cfg.max_providers
            )
        except BridgeClosed as exc:
            raise UpstreamError("libp2p is stopping") from exc

        async def ask(pid: str, addrs: list[str]) -> bool | None:
            try:
                return bool(await self.bridge.call(node.ask_held, pid, addrs, media_id))
            except (PeerdError, BridgeClosed) as exc:
                log.info("copy lookup failed", extra={"peer": pid, "error": str(exc)})
                return None

        answers = await asyncio.gather(*(ask(pid, addrs) for pid, addrs in providers))
        holders = {pid for (pid, _), a in zip(providers, answers, strict=True) if a}
        return holders, all(a is not None for a in answers)

    async def provide_now(self, cids: list[str]) -> list[str]:
        """Announce some ids at once (tests and the CLI); returns those announced."""
        assert self.node is not None
        done = await self.bridge.call(self.node.provide, cids, self.cfg.provide_concurrency)
        self.schedule.done(done, time.time())
        return done


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


class Libp2pSource:
    """Blobs from libp2p providers found on the DHT."""

    name = "libp2p"

    def __init__(self, service: P2PService, *, timeout_s: float, max_providers: int) -> None:
        self.service = service
        self.timeout_s = timeout_s
        self.max_providers = max_providers

    def idle(self) -> bool:
        """No peer to ask: libp2p not running, or no peer connected (the resolver then asks
        R2 first, and still asks this source if R2 does not deliver)."""
        svc = self.service
        node = svc.node
        return node is None or not svc.bridge.running or node.peers == 0

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """One offer per provider that answers OK, unbanned providers in directory order.

        A provider that answers BUSY has the blob but not the time: if no offer came,
        :class:`UpstreamError` tells the resolver to retry rather than answer 404.
        """
        svc = self.service
        node = svc.node
        if node is None or not svc.bridge.running:
            return
        try:
            providers = await svc.bridge.call(node.find_providers, cid, self.max_providers)
        except BridgeClosed as exc:
            raise UpstreamError("libp2p is stopping") from exc
        for pid, addrs in providers:
            svc.directory.seen(pid, addrs=tuple(addrs))
        rank = {p.peer_id: i for i, p in enumerate(svc.directory.order())}
        usable = sorted((p for p in providers if p[0] in rank), key=lambda p: rank[p[0]])
        busy = 0
        for pid, addrs in usable[: self.max_providers]:
            started = time.monotonic()
            try:
                status, size, stream = await svc.bridge.call(node.open_blob, pid, addrs, cid)
            except PeerdError as exc:
                svc.directory.report(pid, False, type(exc).__name__)
                log.info("libp2p provider failed", extra={"peer": pid, "error": str(exc)})
                continue
            svc.directory.rtt(pid, (time.monotonic() - started) * 1000)
            if status != Status.OK:
                # Busy or no longer held: not the provider's fault, just not this time.
                busy += status == Status.BUSY
                continue
            yield Offer(self.name, pid, self._chunks(node, stream, size), size=size)
        if busy:
            raise UpstreamError(f"{busy} libp2p provider(s) of {cid} busy")

    async def _chunks(self, node: TrioNode, stream: Any, size: int) -> AsyncIterator[bytes]:
        bridge = self.service.bridge
        got = 0
        try:
            while got < size:
                chunk = await bridge.call(node.read, stream, min(READ_SIZE, size - got))
                if not chunk:
                    raise UpstreamError(f"libp2p stream ended after {got} of {size} bytes")
                got += len(chunk)
                yield chunk
        except BridgeClosed as exc:
            raise UpstreamError("libp2p stopped during a transfer") from exc
        finally:
            if bridge.running:
                await asyncio.shield(bridge.call(node.close_stream, stream))

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """Feed the outcome into the libp2p peer directory (bans on integrity failures)."""
        self.service.directory.report(offer.peer, ok, reason)
