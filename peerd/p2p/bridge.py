"""The one bridge between the asyncio loop and the trio thread that runs py-libp2p.

py-libp2p is trio-only; peerd is asyncio. :class:`TrioThread` runs ``trio.run`` in one dedicated
thread with a root nursery, and everything crosses here:

- asyncio -> trio, :meth:`TrioThread.call`: the coroutine function is scheduled into the root
  nursery with the trio token's ``run_sync_soon`` (never blocks the loop), runs in its own cancel
  scope, and answers through ``loop.call_soon_threadsafe`` on an asyncio future. Cancelling the
  asyncio caller cancels the trio task.
- trio -> asyncio, :func:`to_asyncio`: ``asyncio.run_coroutine_threadsafe`` with a done-callback
  that wakes the waiting trio task through the token; cancelling the trio task cancels the
  asyncio task.

No worker thread is parked per call (unlike libp2p's own ``_asyncio_bridge``). Stop: cancel the
root nursery, let trio unwind, join the thread (:meth:`TrioThread.stop`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

from peerd.errors import Unavailable

log = logging.getLogger("peerd.p2p")

T = TypeVar("T")


class BridgeClosed(Unavailable):
    """The trio thread is not running (libp2p stopped or never started)."""


class TrioThread:
    """A trio event loop in its own thread, with a root nursery for bridged calls."""

    def __init__(self, name: str = "peerd-trio") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start the thread and wait (off the loop) until trio is running."""
        self.loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._started.wait)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._root)
        except BaseException as exc:  # noqa: BLE001 - reported to the starter and logged
            self._error = exc
            log.error("trio thread crashed", exc_info=exc)
        finally:
            self._token = None
            self._nursery = None
            self._started.set()

    async def _root(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await trio.sleep_forever()

    @property
    def nursery(self) -> trio.Nursery:
        """The root nursery (use only from inside the trio thread)."""
        if self._nursery is None:
            raise BridgeClosed("libp2p is not running")
        return self._nursery

    @property
    def running(self) -> bool:
        """True while trio runs."""
        return self._token is not None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Run ``await fn(*args)`` in trio; returns an asyncio future (awaitable, cancellable)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        token, nursery = self._token, self._nursery
        if token is None or nursery is None:
            fut.set_exception(BridgeClosed("libp2p is not running"))
            return fut
        scope = trio.CancelScope()

        def post(ok: bool, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(answer, ok, value)
            except RuntimeError:  # the loop closed first; nobody is waiting any more
                pass

        def answer(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        async def task() -> None:
            answered = False
            try:
                with scope:
                    value = await fn(*args)
                    post(True, value)
                    answered = True
            except Exception as exc:
                post(False, exc)
                answered = True
            finally:
                # Cancelled by the caller, or by the root nursery on stop: answer anyway, so
                # no asyncio waiter hangs.
                if not answered:
                    post(False, BridgeClosed("libp2p call cancelled"))

        def spawn() -> None:
            nursery.start_soon(task)

        def on_done(f: asyncio.Future[T]) -> None:
            if f.cancelled():
                try:
                    token.run_sync_soon(scope.cancel)
                except trio.RunFinishedError:
                    pass

        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            fut.set_exception(BridgeClosed("libp2p is not running"))
            return fut
        fut.add_done_callback(on_done)
        return fut

    async def stop(self, join_s: float = 5.0) -> bool:
        """Cancel the root nursery and join the thread; True if it ended within ``join_s``."""
        token, nursery = self._token, self._nursery
        if token is not None and nursery is not None:
            try:
                token.run_sync_soon(nursery.cancel_scope.cancel)
            except trio.RunFinishedError:
                pass
        thread = self._thread
        if thread is None:
            return True
        await asyncio.to_thread(thread.join, join_s)
        if thread.is_alive():
            log.error("trio thread did not stop in time", extra={"timeout_s": join_s})
            return False
        return True


async def to_asyncio(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """From trio: run ``coro`` on the asyncio loop and wait for its result."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    cf: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)

    def wake(_: concurrent.futures.Future[T]) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    cf.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        cf.cancel()
        raise
    return cf.result()
