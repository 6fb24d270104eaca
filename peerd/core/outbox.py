"""Replication outbox: the life of one job, as pure decisions.

Theory of operation
-------------------
A job is a row in ``replication_jobs`` (kind, target) and moves through::

    queued --claim--> running --success--> done
      ^                  |  \\--permanent error or attempts exhausted--> failed
      |                  |
      +---retry (backoff)+   (also: lease expired -> claimable again, as if queued)

* ``claim`` takes a job that is due (``queued`` and ``next_attempt_at <= now``) or whose lease
  expired (``running`` and ``lease_until < now``). A claim writes a fresh owner token, so a worker
  that lost its lease can no longer finish the job, and names the :class:`Holder` -- the process
  (boot id, pid, start time) that took it.
* ``reclaim``: a lease whose holder is gone (:func:`holder_gone`: another boot, no process with
  that pid, or a process with that pid that started at another time, i.e. the pid was reused) is
  void at once: its job is queued again without counting a failure, so a killed ``peerd
  replicate push`` or daemon blocks nobody until its leases expire.
* ``fail`` decides between :class:`Retry` (jittered exponential backoff, longer when the server
  asked us to slow down) and :class:`GiveUp`. ``attempts`` counts failures, not claims: a job that
  was only interrupted by a crash is not penalised.
* ``defer`` puts a job back without counting a failure (it waits for another job, e.g. a manifest
  waits until its blobs are in R2).

The module takes ``now`` and a random number in ``[0, 1)`` as arguments; it does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

JOB_KINDS = frozenset(
    {"push_blob", "push_manifest", "pull_media", "delete_blob", "delete_manifest"}
)


@dataclass(frozen=True)
class RetryPolicy:
    """How long leases last and how failures are spaced out."""

    lease_s: float = 300.0
    base_s: float = 2.0
    max_s: float = 600.0
    max_attempts: int = 12
    throttle_factor: float = 4.0


@dataclass(frozen=True)
class Holder:
    """The process holding a lease: ``boot`` id of the machine's current boot, ``pid``, and the
    process's ``started`` time (clock ticks since boot, which tells a reused pid apart)."""

    boot: str
    pid: int
    started: int


def holder_gone(holder: Holder, boot: str, started: int | None) -> bool:
    """True when ``holder`` no longer runs: the machine booted since (``boot`` is the current boot
    id), or ``started`` -- the start time of the live process with ``holder.pid``, None if there
    is none -- differs from the holder's."""
    return holder.boot != boot or started is None or started != holder.started


@dataclass(frozen=True)
class JobView:
    """What the decisions need to know about a job."""

    id: int
    kind: str
    target: str
    state: str
    attempts: int
    lease_until: float | None
    next_attempt_at: float


@dataclass(frozen=True)
class Claim:
    """Take the job until ``lease_until``."""

    job_id: int
    lease_until: float


@dataclass(frozen=True)
class Retry:
    """Try again at ``next_attempt_at``; ``attempts`` is the new failure count."""

    job_id: int
    next_attempt_at: float
    attempts: int
    error: str


@dataclass(frozen=True)
class GiveUp:
    """The job failed for good (it stays visible with its error)."""

    job_id: int
    attempts: int
    error: str


def is_claimable(job: JobView, now: float) -> bool:
    """True when a worker may take ``job`` at ``now``."""
    if job.state == "queued":
        return job.next_attempt_at <= now
    if job.state == "running":
        return job.lease_until is None or job.lease_until < now
    return False


def claim(job: JobView, now: float, policy: RetryPolicy) -> Claim:
    """Claim a claimable job; ValueError otherwise."""
    if not is_claimable(job, now):
        raise ValueError(f"job {job.id} is not claimable in state {job.state}")
    return Claim(job.id, now + policy.lease_s)


def backoff_s(attempts: int, rand: float, policy: RetryPolicy, *, throttled: bool = False) -> float:
    """Delay before attempt ``attempts + 1``: exponential, capped, with "equal jitter".

    Half of the capped delay is fixed and half random, so retries of many jobs that failed
    together (an outage) spread out instead of returning in a burst.
    """
    if not 0.0 <= rand < 1.0:
        raise ValueError("rand must be in [0, 1)")
    base = policy.base_s * (policy.throttle_factor if throttled else 1.0)
    cap = min(policy.max_s, base * 2.0 ** max(0, attempts - 1))
    return cap / 2.0 + rand * cap / 2.0


def fail(
    job: JobView,
    now: float,
    error: str,
    rand: float,
    policy: RetryPolicy,
    *,
    retryable: bool = True,
    throttled: bool = False,
) -> Retry | GiveUp:
    """Decide what follows a failed attempt."""
    attempts = job.attempts + 1
    if not retryable or attempts >= policy.max_attempts:
        return GiveUp(job.id, attempts, error)
    delay = backoff_s(attempts, rand, policy, throttled=throttled)
    return Retry(job.id, now + delay, attempts, error)


def defer(job: JobView, now: float, delay_s: float, reason: str) -> Retry:
    """Put the job back for ``delay_s`` without counting a failure."""
    return Retry(job.id, now + delay_s, job.attempts, reason)
