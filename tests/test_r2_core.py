"""Pure core of replication: outbox job decisions and multipart planning under R2's rules."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.core import outbox
from peerd.core.multipart import (
    MAX_PARTS,
    MIB,
    MIN_PART,
    check_plan,
    composite_checksum,
    plan_parts,
)
from peerd.core.outbox import GiveUp, JobView, Retry, RetryPolicy

POLICY = RetryPolicy(lease_s=60, base_s=2, max_s=100, max_attempts=5)


def job(state: str = "queued", attempts: int = 0, lease: float | None = None, due: float = 0.0):
    return JobView(1, "push_blob", "b", state, attempts, lease, due)


def test_claimable_states() -> None:
    assert outbox.is_claimable(job(due=10), 10)
    assert not outbox.is_claimable(job(due=10.5), 10)
    assert not outbox.is_claimable(job("running", lease=20), 10)
    assert outbox.is_claimable(job("running", lease=9), 10)  # lease expired: worker died
    assert not outbox.is_claimable(job("done"), 10)
    assert not outbox.is_claimable(job("failed"), 10)
    assert outbox.claim(job(), 5, POLICY).lease_until == 65
    with pytest.raises(ValueError):
        outbox.claim(job("done"), 5, POLICY)


def test_backoff_grows_with_jitter_and_cap() -> None:
    lo = [outbox.backoff_s(n, 0.0, POLICY) for n in range(1, 10)]
    hi = [outbox.backoff_s(n, 0.999, POLICY) for n in range(1, 10)]
    assert lo[:4] == [1, 2, 4, 8]
    assert all(h <= 100 for h in hi)
    assert max(hi) > 99
    assert all(a < b for a, b in zip(lo, hi, strict=True))
    assert outbox.backoff_s(1, 0.0, POLICY, throttled=True) == 4 * outbox.backoff_s(1, 0.0, POLICY)
    with pytest.raises(ValueError):
        outbox.backoff_s(1, 1.0, POLICY)


def test_fail_retries_then_gives_up() -> None:
    r = outbox.fail(job(attempts=0), 100, "boom", 0.5, POLICY)
    assert isinstance(r, Retry)
    assert r.attempts == 1
    assert 100 < r.next_attempt_at <= 102
    assert isinstance(outbox.fail(job(attempts=4), 100, "boom", 0.5, POLICY), GiveUp)
    assert isinstance(outbox.fail(job(), 100, "bad", 0.5, POLICY, retryable=False), GiveUp)
    d = outbox.defer(job(attempts=2), 100, 3, "waiting")
    assert d.attempts == 2
    assert d.next_attempt_at == 103


def test_a_lease_holder_is_gone_after_reboot_exit_or_pid_reuse() -> None:
    h = outbox.Holder("boot-1", 42, 1000)
    assert not outbox.holder_gone(h, "boot-1", 1000)
    assert outbox.holder_gone(h, "boot-2", 1000)  # rebooted since
    assert outbox.holder_gone(h, "boot-1", None)  # no process with that pid
    assert outbox.holder_gone(h, "boot-1", 2000)  # the pid belongs to a newer process


@given(st.integers(1, 10**12), st.integers(5, 64))
def test_plan_parts_follow_r2_rules(size: int, part_mib: int) -> None:
    parts = plan_parts(size, part_mib * MIB)
    check_plan(parts, size)
    assert len(parts) <= MAX_PARTS
    assert parts[0].size >= MIN_PART or len(parts) == 1
    assert len({p.size for p in parts[:-1]}) <= 1


def test_plan_parts_refuses_small_parts_and_grows_for_huge_objects() -> None:
    with pytest.raises(ValueError):
        plan_parts(100 * MIB, 4 * MIB)
    with pytest.raises(ValueError):
        plan_parts(0, 5 * MIB)
    parts = plan_parts(10_000 * 5 * MIB + 1, 5 * MIB)
    assert len(parts) <= MAX_PARTS
    assert parts[0].size % MIB == 0
    assert [p.size for p in plan_parts(11 * MIB, 5 * MIB)] == [5 * MIB, 5 * MIB, MIB]


@pytest.mark.parametrize(
    "sizes",
    [[5 * MIB, 4 * MIB, 1], [4 * MIB, 4 * MIB], [5 * MIB, 5 * MIB, 6 * MIB], [5 * MIB, 0]],
)
def test_check_plan_rejects_unequal_or_small_parts(sizes: list[int]) -> None:
    from peerd.core.multipart import Part

    parts, off = [], 0
    for i, s in enumerate(sizes, 1):
        parts.append(Part(i, off, s))
        off += s
    with pytest.raises(ValueError):
        check_plan(tuple(parts), off)


def test_composite_checksum_matches_s3_definition() -> None:
    p1, p2 = b"a" * 10, b"b" * 3
    d1, d2 = hashlib.sha256(p1).digest(), hashlib.sha256(p2).digest()
    want = base64.b64encode(hashlib.sha256(d1 + d2).digest()).decode() + "-2"
    assert composite_checksum([d1, d2]) == want
