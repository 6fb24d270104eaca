"""SRT ingest through the system ffmpeg: each input's SRT listener feeds the node's own RTMP ingest.

No maintained Python binding for libsrt exists and PyAV's bundled FFmpeg is built without it,
but Debian's ``ffmpeg`` CLI has it. So for each configured input (``[live] inputs``, in order)
:class:`SrtService` runs one ffmpeg child::

    ffmpeg -f mpegts -mode listener -passphrase <key> -i srt://HOST:PORT+i
           -c copy -f flv rtmp://<this node's RTMP listener>/live/<key>

Input number ``i`` (from 0) listens on ``[live] srt_listen``'s port plus ``i``: an ffmpeg SRT
listener takes no ``streamid`` routing and one publisher at a time, so one port per input is the
simplest design that works. The input's stream key is the SRT passphrase (10 to 79 characters,
libsrt's bounds; an input whose key is outside them logs one error and gets no listener): SRT
encrypts the stream with it and a publisher with a wrong passphrase fails the handshake inside
libsrt, so it never reaches the node. What is received reaches the live service over the RTMP
hop without re-encoding (no demuxing in peerd), so it goes through the same key check, the
one-publisher rule and the same status, where it shows as ``protocol`` ``rtmp`` from a loopback
address (the ffmpeg child).

A listener serves one publisher and exits when it leaves; it is started again at once. A child
that fails (the port taken, the RTMP hop refused) is started again with backoff. The key is in
the child's argv (visible to local users in ``/proc``) but never in peerd's logs: the child's
stderr is logged (info) with the key redacted, at most :data:`MAX_LOG_LINES` lines per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from peerd import errors
from peerd.config import LiveSettings
from peerd.core.backoff import backoff_delay

if TYPE_CHECKING:
    from peerd.live.rtmp import RtmpService

log = logging.getLogger("peerd.live.srt")

PASSPHRASE_LEN = (10, 79)  # libsrt's bounds for a passphrase
RETRY_MAX_S = 30.0
HEALTHY_S = 30.0  # a child that ran this long failed for a new reason: no backoff
STOP_TIMEOUT_S = 5.0
MAX_LOG_LINES = 20  # per child: a stream of bad handshakes does not flood the log


def listen_address(address: str) -> tuple[str, int]:
    """``host:port`` of ``[live] srt_listen`` (port > 0: inputs take consecutive ports)."""
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not host or not 0 < number < 65536:
        raise errors.ConfigError(f"[live] srt_listen {address!r}: expected host:port, port > 0")
    return host.strip("[]"), number


def _url_host(host: str) -> str:
    """``host`` as a URL writes it; a wildcard address is reached on loopback."""
    with contextlib.suppress(ValueError):  # a name is kept as it is
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            host = "::1" if ip.version == 6 else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class SrtService:
    """One ffmpeg SRT listener per live input (a daemon service: ``run`` until cancelled)."""

    name = "srt"

    def __init__(
        self,
        settings: LiveSettings,
        rtmp: RtmpService,
        secret: Callable[[str], str | None],
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Publishers are handed to ``rtmp``'s listener; keys are read with ``secret``."""
        self.settings = settings
        self.rtmp = rtmp
        self._secret = secret
        self.m_exits = Counter(
            "peerd_live_srt_listener_exits",
            "SRT listener children (ffmpeg) that exited, by outcome (ended: a publisher left; "
            "failed: started again with backoff)",
            ["outcome"],
            registry=registry or CollectorRegistry(),
        )

    async def run(self, ready: Callable[[], None]) -> None:
        """Run a listener per input until cancelled (none when ``srt_listen`` is empty)."""
        s = self.settings
        if not (s.enabled and s.inputs and s.srt_listen):
            ready()
            await asyncio.Event().wait()
        host, port = listen_address(s.srt_listen)
        if port + len(s.inputs) - 1 > 65535:
            raise errors.ConfigError("[live] srt_listen: one port per input runs past 65535")
        if "rtmp" not in self.rtmp.addresses:
            raise errors.ConfigError("[live] srt_listen needs rtmp_listen (SRT goes through it)")
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise errors.ConfigError("[live] srt_listen needs the ffmpeg CLI (Debian: ffmpeg)")
        async with asyncio.TaskGroup() as group:
            for i, cfg in enumerate(s.inputs):
                key = await asyncio.to_thread(self._secret, cfg.secret_name)
                if key is None:
                    continue  # the live service logs the missing key file
                if not PASSPHRASE_LEN[0] <= len(key) <= PASSPHRASE_LEN[1]:
                    log.error(
                        "live input's key cannot be an SRT passphrase (10 to 79 characters): "
                        "no SRT listener for it",
                        extra={"input": cfg.name, "key_file": cfg.secret_name},
                    )
                    continue
                group.create_task(self._listen(exe, cfg.name, host, port + i, key))
            ready()
            await asyncio.Event().wait()

    async def _listen(self, exe: str, input: str, host: str, port: int, key: str) -> None:
        where = {"input": input, "host": host, "port": port}
        log.info("srt listening", extra=where)
        streak = 0
        while True:
            started = time.monotonic()
            rc = await self._child(exe, input, host, port, key)
            if rc == 0 or time.monotonic() - started >= HEALTHY_S:
                streak = 0
            if rc == 0:
                self.m_exits.labels(outcome="ended").inc()
                continue
            self.m_exits.labels(outcome="failed").inc()
            streak += 1
            delay = backoff_delay(streak, 1.0, RETRY_MAX_S, random.random())  # noqa: S311
            log.warning(
                "srt listener failed; starting it again",
                extra={**where, "exit_code": rc, "retry_in_s": round(delay, 1)},
            )
            await asyncio.sleep(delay)

    async def _child(self, exe: str, input: str, host: str, port: int, key: str) -> int:
        """One listener: wait for a publisher, copy it to RTMP until it leaves; the exit code."""
        rhost, rport = self.rtmp.addresses["rtmp"]
        cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "warning", "-nostats"]
        # The key as options, not in the URL: ffmpeg prints URLs in its errors.
        cmd += ["-f", "mpegts", "-mode", "listener", "-passphrase", key]
        cmd += ["-i", f"srt://{_url_host(host)}:{port}", "-map", "0", "-c", "copy"]
        # From MPEG-TS, AAC's config is only known from its first frame: without this flag the
        # FLV header carries an empty one, which the RTMP ingest refuses.
        cmd += ["-flvflags", "aac_seq_header_detect"]
        cmd += ["-f", "flv", f"rtmp://{_url_host(rhost)}:{rport}/live/{key}"]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stderr is not None
            lines = 0
            async for raw in proc.stderr:
                lines += 1
                if lines <= MAX_LOG_LINES:
                    text = raw.decode(errors="replace").rstrip().replace(key, "<key>")
                    log.info("srt ffmpeg: %s", text, extra={"input": input, "port": port})
            return await proc.wait()
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_TIMEOUT_S)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await asyncio.shield(proc.wait())
