"""The life of a command job (prefetch, pin, unpin, evict, promote), as a small state machine.

::

    queued --start--> running --finish--> done
       |                 |
       +-----fail--------+----fail------> failed

``done`` and ``failed`` are final. A job that was ``queued`` or ``running`` when the node stopped
is failed at the next start with ``interrupted by restart`` (its work may be half done; every
command is idempotent, so the coordinator sends it again). Progress is a fraction in [0, 1] that
only grows while running and is 1 when done.

Pure: :func:`transition` takes the job and an event and returns the new job or raises
:class:`JobStateError`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from peerd.errors import Conflict

JobKind = Literal["prefetch", "pin", "unpin", "evict", "promote", "ingest"]
JobStateName = Literal["queued", "running", "done", "failed"]
FINAL: frozenset[str] = frozenset({"done", "failed"})
INTERRUPTED = "interrupted by restart"


class JobStateError(Conflict):
    """An event that is not allowed in the job's state."""


@dataclass(frozen=True)
class Job:
    """A command job."""

    job_id: str
    kind: JobKind
    target: str
    state: JobStateName
    created_at: float
    updated_at: float
    progress: float = 0.0
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        """True for done and failed jobs."""
        return self.state in FINAL


@dataclass(frozen=True)
class Start:
    """The runner picked the job up."""


@dataclass(frozen=True)
class Progress:
    """Part of the work is done."""

    fraction: float


@dataclass(frozen=True)
class Finish:
    """The work succeeded."""

    result: dict[str, Any]


@dataclass(frozen=True)
class Fail:
    """The work failed; ``error`` is for the coordinator's operator."""

    error: str


Event = Start | Progress | Finish | Fail


def transition(job: Job, event: Event, now: float) -> Job:
    """Apply ``event`` to ``job`` at ``now``."""
    if job.final:
        raise JobStateError(f"job {job.job_id} is {job.state}; no more events")
    if isinstance(event, Start):
        if job.state != "queued":
            raise JobStateError(f"job {job.job_id} is {job.state}, cannot start")
        return replace(job, state="running", updated_at=now)
    if isinstance(event, Progress):
        if job.state != "running":
            raise JobStateError(f"job {job.job_id} is {job.state}, cannot progress")
        fraction = min(1.0, max(job.progress, event.fraction))
        return replace(job, progress=fraction, updated_at=now)
    if isinstance(event, Finish):
        if job.state != "running":
            raise JobStateError(f"job {job.job_id} is {job.state}, cannot finish")
        return replace(job, state="done", progress=1.0, result=event.result, updated_at=now)
    return replace(job, state="failed", error=event.error, updated_at=now)
