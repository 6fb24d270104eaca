"""A TCP forwarder that shapes one direction: a home node's uplink, in front of a loopback node.

Every connection's server-to-client bytes draw on one shared token bucket of ``rate_bps`` (bytes
per second, burst of one ``chunk``), so all viewers together get at most the uplink's rate, as
through a shaped home line; client-to-server bytes pass unshaped. ``sent`` counts the bytes the
node got through. Tests use it where no netem exists (this kernel has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class Shaper:
    """``async with Shaper(upstream_port, rate_bps) as s:`` then connect to ``s.port``."""

    def __init__(self, upstream_port: int, rate_bps: float, chunk: int = 16 * 1024) -> None:
        self.upstream_port = upstream_port
        self.rate_bps = rate_bps
        self.chunk = chunk
        self.sent = 0
        self.port = 0
        self._next = time.monotonic()  # when the bucket can pay for the next chunk
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Shaper:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pay(self, n: int) -> None:
        """Wait until ``n`` bytes fit the shared rate (first come, first served)."""
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + n / self.rate_bps
        if start > now:
            await asyncio.sleep(start - now)

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        for coro in (self._pipe(cr, uw, shaped=False), self._pipe(ur, cw, shaped=True)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, shaped: bool
    ) -> None:
        try:
            while data := await reader.read(self.chunk):
                if shaped:
                    await self._pay(len(data))
                    self.sent += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
