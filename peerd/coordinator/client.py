"""The coordinator service: heartbeats, load sampling, job recovery, drain (see the package)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Literal

import aiohttp
from pydantic import ValidationError

from peerd import __version__
from peerd.api.models import CoordinatorReply, LiveHandoff, NodeReport, PlaybackAnomaly
from peerd.api.node import NodeApi
from peerd.core.analytics import Anomaly
from peerd.core.backoff import backoff_delay
from peerd.core.handoff import HandoffStatus
from peerd.core.signed import PEER_HEADER, SIGNATURE_HEADER, b64url, encode_body
from peerd.errors import PeerdError, UpstreamError
from peerd.runtime import Runtime

log = logging.getLogger("peerd.coordinator")

ReportKind = Literal["register", "heartbeat", "drain"]
SAMPLE_INTERVAL_S = 5.0


class CoordinatorError(UpstreamError):
    """A report was not accepted; ``answered`` is the coordinator's HTTP status (0 for network
    errors)."""

    def __init__(self, message: str, answered: int = 0) -> None:
        super().__init__(message)
        self.answered = answered


class CoordinatorService:
    """Reports to the coordinator, samples load, recovers jobs, drains on stop."""

    name = "coordinator"

    def __init__(
        self,
        rt: Runtime,
        api: NodeApi,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        live_handoff: Callable[[], Sequence[HandoffStatus]] | None = None,
        anomalies: Callable[[], list[Anomaly]] | None = None,
    ) -> None:
        self.rt = rt
        self.live_handoff = live_handoff  # peerd.live.handoff.HandoffConsumer.status
        # Playback anomalies (peerd.http.playback): each goes in the next report built after it.
        self.anomalies = anomalies
        self._anomalies_at = 0.0
        self.cfg = rt.settings.coordinator
        self.api = api
        self._clock = clock
        self._rand = rand
        self._session: aiohttp.ClientSession | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.registered = False
        self.interval_s = self.cfg.heartbeat_interval_s
        self.failures = 0
        self.sent: dict[str, int] = {"register": 0, "heartbeat": 0, "drain": 0}
        self._odd_replies: set[str] = set()  # report kinds whose reply was not understood
        self._soon = asyncio.Event()

    def report_soon(self) -> None:
        """Send the next heartbeat now, not at the end of the interval: the inventory changed in
        a way the coordinator should learn at once (an upload was published)."""
        self._soon.set()

    async def run(self, ready: Callable[[], None]) -> None:
        """Recover jobs, then sample load and heartbeat until cancelled."""
        await self.api.jobs.recover()
        stop_budget = self.rt.settings.daemon.stop_timeout_s * 0.8
        if self.cfg.drain_budget_s > stop_budget:
            log.warning(
                "coordinator.drain_budget_s exceeds what the supervisor allows for draining; "
                "raise daemon.stop_timeout_s (and systemd TimeoutStopSec) with it",
                extra={"drain_budget_s": self.cfg.drain_budget_s, "allowed_s": stop_budget},
            )
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            if self.cfg.url:
                self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
            else:
                log.info("no coordinator.url; not reporting to a coordinator")
            ready()
            while True:
                self.api.sample()
                await asyncio.sleep(SAMPLE_INTERVAL_S)
        finally:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                await asyncio.gather(self._heartbeat, return_exceptions=True)
            await asyncio.shield(self.api.jobs.close())
            await asyncio.shield(self._session.close())

    # -- reports ---------------------------------------------------------------------------------

    async def report(
        self, kind: ReportKind, *, drain_deadline_s: float | None = None
    ) -> NodeReport:
        """The current signed-report payload."""
        api = self.api
        info = await api.info()
        load = api.load()
        return NodeReport(
            kind=kind,
            peer_id=info.peer_id,
            name=info.name,
            version=__version__,
            api_version="1",
            public_url=info.public_url,
            addresses=info.addresses,
            capabilities=info.capabilities,
            capacity=await api.capacity(load),
            load=load,
            admission=api.admission(),
            inventory=await api.summary(),
            draining=self.rt.draining or kind == "drain",
            drain_deadline_s=drain_deadline_s,
            live=api.live_inputs(),
            timestamp=round(self._clock(), 3),
            nonce=secrets.token_hex(16),
            live_handoff=None
            if self.live_handoff is None
            else [LiveHandoff(**asdict(s)) for s in self.live_handoff()],
            anomalies=self._new_anomalies(),
        )

    def _new_anomalies(self) -> list[PlaybackAnomaly] | None:
        """The anomalies raised since the last report (None: none, the field is left out)."""
        if self.anomalies is None:
            return None
        new = [a for a in self.anomalies() if a.at > self._anomalies_at]
        if not new:
            return None
        self._anomalies_at = max(a.at for a in new)
        return [
            PlaybackAnomaly.model_validate({**dataclasses.asdict(a), "explained": a.explain()})
            for a in new
        ]

    async def send(
        self,
        kind: ReportKind,
        *,
        drain_deadline_s: float | None = None,
        timeout_s: float | None = None,
    ) -> CoordinatorReply:
        """Sign and POST one report; raises :class:`CoordinatorError` if not accepted."""
        assert self.cfg.url is not None
        if self._session is None:
            raise CoordinatorError("coordinator client is not running")
        report = await self.report(kind, drain_deadline_s=drain_deadline_s)
        # A node without live inputs sends no `live` key: coordinators that predate it see
        # the report they know.
        body = encode_body(report.model_dump(mode="json"))
        headers = {
            "Content-Type": "application/json",
            PEER_HEADER: report.peer_id,
            SIGNATURE_HEADER: b64url(self.rt.identity.sign(body)),
        }
        url = self.cfg.url.rstrip("/") + f"/v1/nodes/{kind}"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with self._session.post(url, data=body, headers=headers, timeout=timeout) as r:
                text = await r.text()
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise CoordinatorError(f"coordinator unreachable: {exc!r}") from exc
        if status // 100 != 2:
            raise CoordinatorError(f"coordinator answered {status}: {text[:200]}", status)
        self.sent[kind] += 1
        try:
            return CoordinatorReply.model_validate_json(text or "{}")
        except ValidationError as exc:
            # Said once per kind (a coordinator that answers oddly does so on every heartbeat),
            # then at debug: the log must not fill with one line every interval.
            level = logging.DEBUG if kind in self._odd_replies else logging.WARNING
            self._odd_replies.add(kind)
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            log.log(
                level,
                "coordinator reply not understood; ignored",
                extra={"kind": kind, "problems": problems[:300]},
            )
            return CoordinatorReply()

    async def _heartbeat_loop(self) -> None:
        while True:
            kind: ReportKind = "heartbeat" if self.registered else "register"
            try:
                reply = await self.send(kind)
            except (PeerdError, OSError, ValidationError) as exc:
                if not isinstance(exc, CoordinatorError):
                    # Building the report failed (disk, catalog): keep trying, loudly.
                    log.exception("cannot build the coordinator report")
                    exc = CoordinatorError(repr(exc))
                if exc.answered == 404:
                    # The coordinator lost us (restarted, expired): register again now.
                    self.registered = False
                    continue
                self.failures += 1
                wait = backoff_delay(
                    self.failures, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rand()
                )
                level = logging.ERROR if 400 <= exc.answered < 500 and exc.answered != 429 else 0
                log.log(
                    level or (logging.WARNING if self.failures == 1 else logging.INFO),
                    "coordinator report failed; backing off",
                    extra={"kind": kind, "error": str(exc), "retry_in_s": round(wait, 2)},
                )
                await asyncio.sleep(wait)
                continue
            if self.failures:
                log.info("coordinator reachable again", extra={"after_failures": self.failures})
            self.failures = 0
            if kind == "register":
                log.info("registered with the coordinator", extra={"url": self.cfg.url})
            self.registered = not reply.reregister
            if reply.heartbeat_interval_s is not None:
                self.interval_s = reply.heartbeat_interval_s
            if self.registered:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._soon.wait(), self.interval_s)
                self._soon.clear()

    # -- drain -----------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Notify the coordinator, let streams finish, upload last copies (see the package doc)."""
        cfg = self.cfg
        start = time.monotonic()
        deadline = start + cfg.drain_budget_s
        self.rt.draining = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if cfg.url and self._session is not None:
            try:
                await self.send(
                    "drain",
                    drain_deadline_s=round(cfg.drain_budget_s, 3),
                    timeout_s=max(
                        0.05, min(cfg.drain_notice_timeout_s, deadline - time.monotonic())
                    ),
                )
                log.info("drain notice sent")
            except CoordinatorError as exc:
                log.warning("drain notice not delivered", extra={"error": str(exc)})
        await self._wait_streams(min(deadline, time.monotonic() + cfg.drain_streams_s))
        replicator = self.api.parts.replicator
        left = deadline - time.monotonic()
        if replicator is not None and left > 0:
            try:
                n = await asyncio.wait_for(replicator.upload_last_copies(left), timeout=left + 0.5)
            except TimeoutError:
                log.warning("last-copy upload ran out of drain budget")
            else:
                log.info("last copies uploaded before exit", extra={"blobs": n})
        elif replicator is None:
            log.info("no replicator; last copies stay on this node only")
        log.info("drained", extra={"seconds": round(time.monotonic() - start, 3)})

    async def _wait_streams(self, until: float) -> None:
        while time.monotonic() < until:
            load = self.api.load()
            if not load.active_streams_measured or load.active_streams == 0:
                return
            await asyncio.sleep(0.05)
