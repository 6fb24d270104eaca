"""Supervisor: ordered start, restart with backoff, fatal errors, drain and stop order."""

import asyncio
from collections.abc import Callable

from peerd.daemon import Supervisor
from peerd.errors import ConfigError, UpstreamError


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []


class Good:
    def __init__(self, name: str, rec: Recorder) -> None:
        self.name = name
        self.rec = rec

    async def run(self, ready: Callable[[], None]) -> None:
        self.rec.events.append(f"start {self.name}")
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            self.rec.events.append(f"stop {self.name}")

    async def drain(self) -> None:
        self.rec.events.append(f"drain {self.name}")


class Flaky:
    name = "flaky"

    def __init__(self, rec: Recorder, fail_times: int, exc: Exception) -> None:
        self.rec = rec
        self.left = fail_times
        self.exc = exc

    async def run(self, ready: Callable[[], None]) -> None:
        self.rec.events.append("start flaky")
        ready()
        await asyncio.sleep(0.01)
        if self.left > 0:
            self.left -= 1
            raise self.exc
        await asyncio.Event().wait()


async def test_order_drain_and_stop() -> None:
    rec = Recorder()
    sup = Supervisor([Good("a", rec), Good("b", rec)], stop_timeout_s=2)
    ready: list[bool] = []
    sup._on_ready = lambda: ready.append(True)
    task = asyncio.create_task(sup.run())
    await asyncio.sleep(0.05)
    assert ready == [True]
    sup.request_stop(0)
    assert await task == 0
    assert rec.events == ["start a", "start b", "drain b", "drain a", "stop b", "stop a"]


async def test_restarts_with_backoff_then_recovers() -> None:
    rec = Recorder()
    sup = Supervisor([Flaky(rec, 2, UpstreamError("r2 down"))], backoff_max_s=0.05)
    task = asyncio.create_task(sup.run())
    for _ in range(100):
        if rec.events.count("start flaky") == 3:
            break
        await asyncio.sleep(0.02)
    assert rec.events.count("start flaky") == 3
    assert not task.done()
    sup.request_stop(0)
    assert await task == 0


async def test_gives_up_after_max_restarts() -> None:
    rec = Recorder()
    sup = Supervisor([Flaky(rec, 100, RuntimeError("boom"))], backoff_max_s=0.01, max_restarts=2)
    code = await asyncio.wait_for(sup.run(), 5)
    assert code == 1
    assert rec.events.count("start flaky") == 3


async def test_fatal_error_stops_with_its_exit_code() -> None:
    rec = Recorder()
    sup = Supervisor([Good("a", rec), Flaky(rec, 1, ConfigError("bad key"))])
    code = await asyncio.wait_for(sup.run(), 5)
    assert code == 2
    assert "stop a" in rec.events


async def test_failure_before_ready_is_retried() -> None:
    class FailsFirst:
        name = "ff"
        tries = 0

        async def run(self, ready: Callable[[], None]) -> None:
            FailsFirst.tries += 1
            if FailsFirst.tries == 1:
                raise UpstreamError("not yet")
            ready()
            await asyncio.Event().wait()

    sup = Supervisor([FailsFirst()], backoff_max_s=0.01)
    task = asyncio.create_task(sup.run())
    await asyncio.sleep(0.2)
    assert FailsFirst.tries == 2
    sup.request_stop(0)
    assert await task == 0
