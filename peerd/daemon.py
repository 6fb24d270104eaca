"""The daemon: one supervisor that wires and runs every service.

Theory of operation
-------------------
:func:`run_daemon` opens the runtime (identity, catalog, store), runs crash recovery if the last
stop was not clean, then hands the services from :func:`build_services` to a :class:`Supervisor`.

The supervisor starts services one at a time, in order, waiting for each to call ``ready()``;
when all are ready it tells systemd ``READY=1`` and pings ``WATCHDOG=1`` from the event loop (so a
blocked loop gets the unit restarted). A service that fails is restarted with exponential backoff
if its error allows (``PeerdError.restart``, or any unexpected exception), up to
``daemon.max_restarts`` times in ten minutes; a non-restartable error, or too many restarts, stops
the daemon with a non-zero exit code that systemd's ``Restart=on-failure`` acts on.

On SIGTERM or SIGINT: ``STOPPING=1``, then each service's optional ``drain()`` in reverse start
order, then cancellation in reverse order, all within ``daemon.stop_timeout_s`` (below systemd's
default 10 s stop timeout). A clean stop records a marker so the next start skips the full store
scan; the exit code is 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from peerd import __version__, ui
from peerd.api import routes as api_routes
from peerd.api.commands import Subsystems
from peerd.api.node import NodeApi
from peerd.config import Settings
from peerd.control import ControlService
from peerd.coordinator.client import CoordinatorService
from peerd.core.ids import Cid
from peerd.delivery import Resolver, Source
from peerd.delivery.media import MediaResolver
from peerd.discovery.directory import PeerDirectory
from peerd.errors import ConfigError, PeerdError
from peerd.http import hls, swarm
from peerd.http.clientip import parse_networks
from peerd.http.playback import PlaybackAnalytics, served_bytes
from peerd.http.server import HttpService, RouteInstaller
from peerd.live import llhls
from peerd.live.handoff import HandoffConsumer
from peerd.live.ladder import LiveLadder
from peerd.live.overflow import LiveOverflow
from peerd.live.record import Recorder
from peerd.live.relay import LiveRelay
from peerd.live.relay import install_origin as live_origin_routes
from peerd.live.rtmp import RtmpService
from peerd.live.service import LiveService
from peerd.live.srt import SrtService
from peerd.live.whep import LiveWhep
from peerd.live.whep import install as live_whep_routes
from peerd.live.whip import WhipIngest
from peerd.live.whip import install as live_whip_routes
from peerd.media.ingest import MediaService, node_ingestor
from peerd.media.ondemand import OnDemand
from peerd.media.source import TranscodeSource
from peerd.metrics import Metrics
from peerd.p2p import lan
from peerd.runtime import Runtime, open_runtime
from peerd.systemd import notify, watchdog_interval
from peerd.webrtc import routes as whep_routes
from peerd.webrtc.session import WhepService

if TYPE_CHECKING:
    from peerd.p2p.service import P2PService
    from peerd.replication.r2 import R2Client
    from peerd.replication.service import Replicator
    from peerd.replication.source import BucketLink
    from peerd.replication.uploads import Uploads

log = logging.getLogger("peerd.daemon")

CLEAN_KEY = "clean_shutdown"
RESTART_WINDOW_S = 600.0


@runtime_checkable
class Service(Protocol):
    """A long-running part of the daemon."""

    name: str

    async def run(self, ready: Callable[[], None]) -> None:
        """Run until cancelled; call ``ready()`` once serving."""


@runtime_checkable
class Drainable(Protocol):
    """A service that can finish in-flight work before it is cancelled."""

    async def drain(self) -> None:
        """Stop taking new work and finish what is in flight."""


@dataclass
class _Slot:
    service: Service
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    """Runs services, restarts them on failure, stops them in order."""

    def __init__(
        self,
        services: list[Service],
        *,
        metrics: Metrics | None = None,
        stop_timeout_s: float = 8.0,
        backoff_max_s: float = 30.0,
        max_restarts: int = 5,
        ready_timeout_s: float = 60.0,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._slots = [_Slot(s) for s in services]
        self._metrics = metrics
        self._stop_timeout = stop_timeout_s
        self._backoff_max = backoff_max_s
        self._max_restarts = max_restarts
        self._ready_timeout = ready_timeout_s
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._failure: asyncio.Queue[tuple[_Slot, BaseException | None]] = asyncio.Queue()

    def request_stop(self, exit_code: int = 0) -> None:
        """Ask the supervisor to stop all services (idempotent; the first code wins)."""
        if not self._stop.is_set():
            self._exit_code = exit_code
            self._stop.set()

    def _start(self, slot: _Slot) -> None:
        slot.ready.clear()
        task = asyncio.create_task(slot.service.run(slot.ready.set), name=slot.service.name)
        slot.task = task

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled():
                return
            self._failure.put_nowait((slot, t.exception()))

        task.add_done_callback(done)

    async def run(self) -> int:
        """Start everything, supervise until stopped, return the exit code."""
        try:
            for slot in self._slots:
                if self._stop.is_set():
                    break
                self._start(slot)
                await self._wait_ready(slot)
            if not self._stop.is_set():
                log.info(
                    "all services ready", extra={"services": [s.service.name for s in self._slots]}
                )
                if self._on_ready is not None:
                    self._on_ready()
            watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
            failures = asyncio.create_task(self._handle_failures(), name="supervisor")
            await self._stop.wait()
            watchdog.cancel()
            failures.cancel()
        finally:
            await self._shutdown()
        return self._exit_code

    async def _wait_ready(self, slot: _Slot) -> None:
        assert slot.task is not None
        ready = asyncio.create_task(slot.ready.wait())
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, stop, slot.task},
                timeout=self._ready_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
            stop.cancel()
        if not done:
            log.error("service did not become ready", extra={"service": slot.service.name})
            self.request_stop(1)
            return
        if slot.task in done and not slot.ready.is_set():
            exc = None if slot.task.cancelled() else slot.task.exception()
            # Drain the queued failure so it is handled here, once.
            while not self._failure.empty():
                self._failure.get_nowait()
            await self._on_failure(slot, exc, starting=True)

    async def _handle_failures(self) -> None:
        while True:
            slot, exc = await self._failure.get()
            await self._on_failure(slot, exc, starting=False)

    async def _on_failure(self, slot: _Slot, exc: BaseException | None, *, starting: bool) -> None:
        name = slot.service.name
        if self._stop.is_set():
            return
        if exc is None:
            log.info("service finished", extra={"service": name})
            return
        if isinstance(exc, PeerdError) and not exc.restart:
            code = getattr(exc, "exit_code", 1)
            log.error(
                "service failed; stopping", extra={"service": name, "error": str(exc), "code": code}
            )
            self.request_stop(code)
            return
        now = time.monotonic()
        slot.restarts = [t for t in slot.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(slot.restarts) > self._max_restarts:
            log.error(
                "service keeps failing; stopping",
                extra={"service": name, "error": repr(exc), "restarts": len(slot.restarts) - 1},
            )
            self.request_stop(1)
            return
        delay = min(self._backoff_max, 0.5 * 2 ** (len(slot.restarts) - 1))
        log.warning(
            "service failed; restarting",
            extra={"service": name, "error": repr(exc), "delay_s": delay},
            exc_info=exc,
        )
        if self._metrics is not None:
            self._metrics.service_restarts.labels(service=name).inc()
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
            return
        except TimeoutError:
            pass
        self._start(slot)
        if starting:
            await self._wait_ready(slot)

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _shutdown(self) -> None:
        deadline = time.monotonic() + self._stop_timeout
        running = [s for s in self._slots if s.task is not None and not s.task.done()]
        for slot in reversed(running):
            svc = slot.service
            if isinstance(svc, Drainable):
                left = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(svc.drain(), timeout=max(0.1, left * 0.8))
                except TimeoutError:
                    log.warning("drain timed out", extra={"service": svc.name})
                except Exception as exc:
                    log.warning("drain failed", extra={"service": svc.name, "error": repr(exc)})
        for slot in reversed(running):
            assert slot.task is not None
            slot.task.cancel()
            left = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(slot.task), timeout=left)
            except (asyncio.CancelledError, TimeoutError):
                pass
            except Exception as exc:
                log.warning(
                    "service raised on stop",
                    extra={"service": slot.service.name, "error": repr(exc)},
                )


# -- wiring ----------------------------------------------------------------------------------------


@dataclass
class Services:
    """What :func:`build_services` built: the services in start order, the parts they share,
    and the R2 client to close once every service has stopped."""

    run: list[Service]
    resolver: Resolver
    api: NodeApi
    r2: R2Client | None = None

    async def close(self) -> None:
        """Close what the services shared (the R2 client), after they stopped."""
        if self.r2 is not None:
            await self.r2.close()


async def build_services(rt: Runtime) -> Services:
    """Every service of the node, each handed what it uses: the one place that wires peerd.

    The resolver gets its sources in delivery order (LAN, libp2p, R2, transcode); the libp2p
    stack, zeroconf and the R2 client are imported only when their part is on.
    """
    s = rt.settings
    sources: list[Source] = []
    directory = lan.lan_directory(rt)
    lan_source: lan.LanSource | None = None
    if s.mdns.enabled:
        # LAN peers come from mDNS only: without it the LAN source would never have a peer.
        lan_source = lan.LanSource(
            rt, directory, timeout_s=s.mdns.fetch_timeout_s, max_peers=s.mdns.max_peers_per_fetch
        )
        sources.append(lan_source)
    p2p: P2PService | None = None
    if s.p2p.enabled:
        from peerd.p2p.service import Libp2pSource, P2PService

        p2p = P2PService(rt)
        sources.append(
            Libp2pSource(p2p, timeout_s=s.p2p.fetch_timeout_s, max_providers=s.p2p.max_providers)
        )
    # Peers answer a media id on their blob protocols with its manifest; R2 keeps manifests
    # under their own key.
    manifest_sources = list(sources)
    r2 = await _r2_client(rt)
    replicator: Replicator | None = None
    r2_services: list[Service] = []
    may_prefetch: Callable[[], bool] | None = None
    on_fetched: Callable[[Cid, str], None] | None = None
    if r2 is not None:
        from peerd.replication.budget import request_ledger
        from peerd.replication.metrics import r2_metrics
        from peerd.replication.service import Replicator
        from peerd.replication.source import R2ManifestSource, R2Source
        from peerd.replication.tiering import CopyFinder, TieringService

        sources.append(
            R2Source(
                r2,
                catalog=rt.catalog,
                timeout_s=s.r2.fetch_timeout_s,
                metrics=r2_metrics(rt.metrics.registry),
                ledger=request_ledger(rt),
            )
        )
        manifest_sources.append(R2ManifestSource(r2, timeout_s=s.r2.fetch_timeout_s))
        # Prefetching is optional spending: it stops first when the R2 budget runs low.
        may_prefetch = partial(request_ledger(rt).allows, "optional")
        replicator = Replicator(rt, r2)
        finders: list[CopyFinder] = [f for f in (lan_source, p2p) if f is not None]
        tiering = TieringService(rt, replicator, r2, finders=finders)
        on_fetched = tiering.fetched
        r2_services = [replicator, tiering]
    ingestor = node_ingestor(rt)
    sources.append(TranscodeSource(ingestor))
    # Failing sources are retried within half a viewer's request time: the other half leaves
    # room for the last round and the answer (503 + Retry-After, not a timeout).
    retry_s = rt.settings.http.request_timeout_s / 2
    resolver = Resolver(
        rt.store,
        sources,
        registry=rt.metrics.registry,
        retry_s=retry_s,
        may_prefetch=may_prefetch,
        on_fetched=on_fetched,
    )
    finder = MediaResolver(
        rt.catalog, manifest_sources, registry=rt.metrics.registry, retry_s=retry_s
    )
    bucket = _bucket_url(rt, r2)
    analytics = _analytics(rt)
    whep = WhepService(rt, resolver=resolver, finder=finder, analytics=analytics)
    # Live inputs (issue 22): every publication goes to the LL-HLS packager, the WHEP fan-out
    # and the recorder; the ingest adapters (RTMP, WHIP) ask `live` who may publish.
    recorder = Recorder(s.state_dir / "live", ingestor, s.live.inputs, segment_s=s.live.segment_s)
    live_hls = llhls.LiveHls(rt)
    live_whep = LiveWhep(whep)
    # Hand-off to Cloudflare Stream ([live.handoff]): its audience is the LL-HLS and WHEP one.
    handoff = (
        HandoffConsumer(
            s,
            rt.uplink,
            lambda name: live_hls.viewers(name) + live_whep.viewers(name),
            registry=rt.metrics.registry,
            # R2 takes live overflow (live/overflow) while the bucket can be sent viewers.
            spill=bucket.ready if bucket is not None and replicator is not None else lambda: False,
        )
        if s.live.handoff.enabled
        else None
    )
    live = LiveService(
        s.live,
        secret=s.secret,
        # the ABR ladder after the packager: it reads the source stream a publication starts
        consumers=[
            live_hls,
            LiveLadder(rt, live_hls),
            live_whep,
            *([handoff] if handoff is not None else []),
        ],
        recorder=recorder,
        registry=rt.metrics.registry,
    )
    live.add_viewer_counter(live_hls.viewers)
    live.add_viewer_counter(live_whep.viewers)
    live.add_latency(live_hls.latency)
    whip = WhipIngest(rt, live, whep.ice)
    # Other nodes' live inputs relayed to this node's viewers; origins are found among LAN peers.
    relay = LiveRelay(rt, live_hls, resolver, directory) if s.mdns.enabled else None
    # Past the uplink budget live segments go to the bucket, and new viewers after them.
    overflow = (
        None if replicator is None else LiveOverflow(rt, live_hls, replicator.push_blob, bucket)
    )
    rtmp = RtmpService(s.live, live, registry=rt.metrics.registry, addr_dir=s.state_dir)
    srt = SrtService(s.live, rtmp, s.secret, registry=rt.metrics.registry)  # SRT -> own RTMP
    api = NodeApi(
        rt, Subsystems(resolver, replicator, lan_source, ingestor, finder, bucket, live=live)
    )
    ondemand = OnDemand(
        ingestor,
        resolver,
        timeout_s=s.http.request_timeout_s,
        ahead=s.media.on_demand_ahead,
        registry=rt.metrics.registry,
    )
    http = HttpService(
        rt,
        route_installers(
            resolver,
            directory,
            api,
            whep,
            ondemand,
            finder,
            bucket,
            LiveParts(live, live_hls, live_whep, whip, relay, overflow),
            analytics,
        ),
    )
    services: list[Service] = [http]
    if analytics is not None:
        services.append(analytics)
    if p2p is not None:
        services.append(p2p)
    if lan_source is not None:
        from peerd.discovery.mdns import MdnsService

        services.append(MdnsService(rt, directory, lambda: http.port, p2p, [lan_source.close]))
    services += r2_services
    services.append(MediaService(rt, ingestor))
    services.append(ondemand)
    coordinator = CoordinatorService(
        rt,
        api,
        live_handoff=handoff.status if handoff is not None else None,
        anomalies=analytics.recent if analytics is not None else None,
    )
    uploads: Uploads | None = None
    if r2 is not None and replicator is not None:
        from peerd.replication.uploads import Uploads

        # Media enters through the bucket; a published upload is reported by a heartbeat now.
        uploads = Uploads(rt, r2, replicator, ingestor, report=coordinator.report_soon)
        services.append(uploads)
    # `peerd ingest` (files, or uploads in the bucket) handed to the daemon
    services.append(ControlService(rt, ingestor, uploads))
    live.add_listener(coordinator.report_soon)  # a connect, drop or recording: heartbeat now
    services.append(live)
    if handoff is not None:
        services.append(handoff)
    if overflow is not None:
        services.append(overflow)
    services.append(whep)
    services += [whip, rtmp, srt]  # publishers only once the service and its consumers run
    services.append(coordinator)
    return Services(services, resolver, api, r2)


def route_installers(
    resolver: Resolver,
    directory: PeerDirectory,
    api: NodeApi,
    whep: WhepService,
    ondemand: OnDemand,
    finder: MediaResolver,
    bucket_url: hls.BlobUrl | None = None,
    live: LiveParts | None = None,
    analytics: PlaybackAnalytics | None = None,
) -> list[RouteInstaller]:
    """Every subsystem's HTTP routes, in order, each bound to the parts it uses."""
    live_routes: list[RouteInstaller] = []
    if live is not None:
        live_routes = [
            partial(
                llhls.install,
                hls=live.hls,
                relay=live.relay,
                spill=live.overflow.spill if live.overflow else None,
                analytics=analytics,
            ),
            partial(live_origin_routes, hls=live.hls, directory=directory),
            partial(live_whep_routes, live=live.whep),
            partial(live_whip_routes, whip=live.whip),
        ]
    return [
        partial(
            ui.install,
            resolver=resolver,
            live=live.service if live else None,
            analytics=analytics,
        ),
        partial(
            hls.install,
            resolver=resolver,
            ondemand=ondemand,
            finder=finder,
            bucket_url=bucket_url,
            analytics=analytics,
        ),
        partial(lan.install, directory=directory, resolver=resolver),
        partial(api_routes.install, api=api, analytics=analytics),
        partial(whep_routes.install, whep=whep),
        partial(swarm.install, ice=whep.ice_servers, analytics=analytics),
        *live_routes,
    ]


@dataclass(frozen=True)
class LiveParts:
    """The live service and the parts with routes of their own."""

    service: LiveService
    hls: llhls.LiveHls
    whep: LiveWhep
    whip: WhipIngest
    relay: LiveRelay | None = None
    overflow: LiveOverflow | None = None


def _analytics(rt: Runtime) -> PlaybackAnalytics | None:
    """Playback analytics (``[analytics]``), or None when off."""
    s = rt.settings
    if not s.analytics.enabled:
        return None
    m = rt.metrics
    return PlaybackAnalytics(
        rt.catalog,
        s.analytics,
        m.registry,
        parse_networks(s.http.trusted_proxies),
        served_bytes([m.bytes_served, m.swarm_viewer_bytes]),
    )


def _bucket_url(rt: Runtime, r2: R2Client | None) -> BucketLink | None:
    """Where streams over the uplink budget get a blob the bucket holds: the bucket's public
    domain (``[r2] public_base_url``) or a presigned URL; None without R2 (they get 503)."""
    if r2 is None:
        return None
    from peerd.replication.budget import request_ledger
    from peerd.replication.metrics import r2_metrics
    from peerd.replication.source import BucketLink

    return BucketLink(
        r2,
        rt.catalog,
        expires_s=rt.settings.uplink.presign_expiry_s,
        public_base_url=rt.settings.r2.public_base_url,
        metrics=r2_metrics(rt.metrics.registry),
        ledger=request_ledger(rt),
        down_s=rt.settings.uplink.retry_after_s,
    )


async def _r2_client(rt: Runtime) -> R2Client | None:
    """The node's R2 client, or None when R2 is not configured."""
    from peerd.replication.r2 import config_from_settings

    cfg = await asyncio.to_thread(config_from_settings, rt.settings)  # reads secret files
    if cfg is None:
        log.info("R2 is not configured; replication and tiering are off")
        return None
    from peerd.replication.budget import request_ledger
    from peerd.replication.r2 import R2Client

    # Every request is counted against the month's budgets, and no class B request goes out
    # past its budget (the ledger raises BudgetSpent); the month's counts so far come first.
    ledger = request_ledger(rt)
    await ledger.load()
    return R2Client(cfg, on_request=ledger.on_request)


async def run_daemon(settings: Settings) -> int:
    """Run a node until SIGTERM/SIGINT; returns the process exit code."""
    started = time.monotonic()
    try:
        rt = await open_runtime(settings)
    except PeerdError as exc:
        log.error("cannot start", extra={"error": exc.message})
        return getattr(exc, "exit_code", 1)
    for key in settings.uplink_keys_ignored():
        log.warning("config key ignored: [uplink] budget_mbps is set", extra={"key": key})
    try:
        if await rt.catalog.get_state(CLEAN_KEY) != "1":
            notify("STATUS=recovering store after an unclean stop")
            report = await rt.store.recover()
            log.info("store recovered after unclean stop", extra=vars(report))
        await rt.catalog.set_state(CLEAN_KEY, "0")
        rt.metrics.store_bytes.set_function(lambda: rt.store.used_bytes)
        rt.metrics.store_blobs.set_function(lambda: rt.store.count)
        rt.metrics.up.set(1)
        built = await build_services(rt)
        sup = Supervisor(
            built.run,
            metrics=rt.metrics,
            stop_timeout_s=settings.daemon.stop_timeout_s,
            backoff_max_s=settings.daemon.restart_backoff_max_s,
            max_restarts=settings.daemon.max_restarts,
            on_ready=lambda: _ready(rt, started),
        )
        loop = asyncio.get_running_loop()

        def on_signal(signame: str) -> None:
            if rt.draining:
                log.info("already stopping", extra={"signal": signame})
                return
            log.info("stop requested", extra={"signal": signame})
            rt.draining = True
            notify("STOPPING=1")
            sup.request_stop(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            code = await sup.run()
        finally:
            await asyncio.shield(built.close())
            # Stay deaf to repeated stop signals while the last rows are written and the
            # loop closes: a second SIGTERM must not turn a clean stop into a kill.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        if code == 0:
            await rt.catalog.set_state(CLEAN_KEY, "1")
        log.info("stopped", extra={"exit_code": code})
        return code
    except ConfigError as exc:
        log.error("configuration error", extra={"error": exc.message})
        return exc.exit_code
    finally:
        await rt.close()


def _ready(rt: Runtime, started: float) -> None:
    rt.node.ready = True
    elapsed = time.monotonic() - started
    log.info(
        "peerd ready",
        extra={
            "version": __version__,
            "peer_id": rt.identity.peer_id,
            "startup_s": round(elapsed, 3),
            "blobs": rt.store.count,
        },
    )
    notify(f"READY=1\nSTATUS=serving {rt.store.count} blobs")
