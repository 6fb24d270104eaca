"""Outbox leases name their holder: a gone holder's jobs are reclaimed at once, a live one's are
waited for (and reported); failed jobs are retried on demand and counted by their latest state."""

from __future__ import annotations

from peerd.catalog.outbox import Outbox
from peerd.core.outbox import Holder, RetryPolicy
from peerd.runtime import Runtime

POLICY = RetryPolicy(lease_s=300, base_s=0.01, max_s=0.05, max_attempts=1)
A = Holder("boot", 100, 1)
B = Holder("boot", 200, 1)


def outbox_of(runtime: Runtime, me: Holder, alive: set[Holder]) -> Outbox:
    return Outbox(runtime.catalog, POLICY, holder=me, alive=lambda h: h in alive)


async def test_jobs_of_a_gone_holder_are_reclaimed_at_once(runtime: Runtime) -> None:
    a = outbox_of(runtime, A, {A, B})
    for t in ("x", "y", "z"):
        await a.enqueue("push_blob", t)
    held = await a.claim(2)
    assert len(held) == 2

    b_alive = outbox_of(runtime, B, {A, B})
    assert [j.target for j in await b_alive.claim(5)] == ["z"]
    leases = await b_alive.leases()
    assert [(lease.holder, lease.jobs) for lease in leases] == [(A, 2)]
    assert leases[0].until > 0

    b = outbox_of(runtime, B, {B})  # A was killed: its 300 s leases do not hold B up
    taken = await b.claim(5)
    assert sorted(j.target for j in taken) == ["x", "y"]
    assert all(j.attempts == 0 for j in taken)
    assert not await a.complete(held[0])  # the killed holder's token no longer counts
    assert await b.leases() == []


async def test_failed_jobs_are_retried_and_counted_by_latest_state(runtime: Runtime) -> None:
    ob = outbox_of(runtime, A, {A})
    await ob.enqueue("push_blob", "x")
    await ob.enqueue("push_blob", "y")
    for j in await ob.claim(2):
        await ob.fail(j, "outage")  # max_attempts=1: gives up at once
    assert await ob.failed_count() == 2
    assert await ob.failed_of("push_blob", ["x", "y", "w"]) == {"x", "y"}
    assert await ob.retry_failed() == 2
    assert await ob.failed_count() == 0
    jobs = await ob.claim(2)
    assert {(j.target, j.attempts) for j in jobs} == {("x", 0), ("y", 0)}
    await ob.complete(jobs[0])
    await ob.fail(jobs[1], "again")
    assert await ob.failed_count() == 1
