"""One error root for peerd.

Every error peerd raises on purpose derives from :class:`PeerdError`. Each class carries two hints
that the edges act on, so that no caller has to map exceptions by hand:

``status``
    the HTTP status the error middleware answers with (``peerd.http.server``);
``restart``
    what the supervisor (``peerd.daemon``) does when the error escapes a service: restart the
    service with backoff (``True``) or stop the daemon with a non-zero exit code (``False``).

An error worth repeating soon (429, 503) also names the ``Retry-After`` the edges send
(``retry_after_s``; an instance raised with ``retry_after=N`` sends ``N``).

::

    PeerdError (500, restart)
    ├── ConfigError (500, stop; exit code 2)
    ├── BadRequest (400)
    │   ├── MediaError (422)          input media that cannot be packaged
    │   │   ├── ManifestError         a malformed manifest (core.manifest)
    │   │   ├── Unsupported           a file the native remuxer cannot read (media.isobmff)
    │   │   └── BoxError              bytes that are not well-formed ISO-BMFF boxes (media.fmp4)
    │   └── RangeNotSatisfiable (416) a byte range outside the blob
    ├── Unauthorized (401)
    ├── Forbidden (403)
    │   └── AccessDenied              no valid Cloudflare Access JWT (http.access)
    ├── NotFound (404)
    ├── Conflict (409)
    │   ├── NotConfigured (409)       needs a subsystem this node does not run
    │   └── JobStateError             an event the command job's state forbids (core.jobs)
    ├── TooManyRequests (429)
    ├── StoreFull (507)               disk quota or a full disk
    ├── IntegrityError (502)          bytes did not hash to their id
    ├── UpstreamError (502)           a peer or R2 failed
    │   ├── R2Error                   a request to R2 failed (replication.r2)
    │   │   └── AlreadyExists         a conditional put found the key taken
    │   └── CoordinatorError          the coordinator did not accept a report (coordinator.client)
    ├── Unavailable (503)             shutting down, draining, not ready, upstreams failing
    │   ├── BridgeClosed              libp2p's trio thread is not running (p2p.bridge)
    │   └── BudgetSpent               the month's R2 class B budget allows no more requests
    ├── Cancelled (500)               a packaging job was cancelled (media.package)
    └── JobFailed (500)               a replication job given up (replication.service)

A class defined in another module (named in brackets) keeps the hints of its parent. Messages are
written for the operator reading the log or the client reading the body: they name the thing and
the reason, and never contain secrets.
"""

from __future__ import annotations

from typing import Any, ClassVar


class PeerdError(Exception):
    """Root of every deliberate peerd error."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    restart: ClassVar[bool] = True
    # Seconds for the ``Retry-After`` of an answer that is worth repeating soon (None: not sent);
    # an instance raised with ``retry_after=`` in its detail says its own.
    retry_after_s: int | None = None

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if detail.get("retry_after") is not None:
            self.retry_after_s = int(detail["retry_after"])

    def to_json(self) -> dict[str, Any]:
        """The body the HTTP layer returns: machine code plus a human message."""
        return {"error": self.code, "message": self.message}


class ConfigError(PeerdError):
    """Invalid or missing configuration; the daemon cannot start (exit code 2)."""

    code = "config"
    restart = False
    exit_code: ClassVar[int] = 2


class BadRequest(PeerdError):
    """The request or input is malformed."""

    status = 400
    code = "bad_request"


class MediaError(BadRequest):
    """Input media that cannot be packaged (corrupt, unsupported, no video...)."""

    status = 422
    code = "bad_media"


class RangeNotSatisfiable(BadRequest):
    """A byte range that lies (partly) outside the blob."""

    status = 416
    code = "range_not_satisfiable"


class Unauthorized(PeerdError):
    """No credentials or unusable credentials."""

    status = 401
    code = "unauthorized"


class Forbidden(PeerdError):
    """Credentials present but not valid for this request (tampered, expired, wrong scope)."""

    status = 403
    code = "forbidden"


class NotFound(PeerdError):
    """The thing asked for is not known or not held."""

    status = 404
    code = "not_found"


class Conflict(PeerdError):
    """The request conflicts with current state."""

    status = 409
    code = "conflict"


class NotConfigured(Conflict):
    """The request needs a subsystem this node does not run (e.g. R2 is not configured)."""

    code = "not_configured"


class TooManyRequests(PeerdError):
    """A concurrency or rate cap was reached."""

    status = 429
    code = "too_many_requests"
    retry_after_s = 1


class StoreFull(PeerdError):
    """The blob store's quota is reached or the disk is full."""

    status = 507
    code = "store_full"


class IntegrityError(PeerdError):
    """Bytes did not hash to the content id they were fetched for."""

    status = 502
    code = "integrity"


class UpstreamError(PeerdError):
    """A peer, R2 or another upstream failed to deliver."""

    status = 502
    code = "upstream"


class Unavailable(PeerdError):
    """Not ready, draining or shutting down; or every upstream of a blob failed for now (none
    said it does not exist), so the same request may well succeed in a moment."""

    status = 503
    code = "unavailable"
    retry_after_s = 2


class BudgetSpent(Unavailable):
    """The month's R2 class B request budget allows no more requests for this purpose
    (``peerd.replication.budget``): the blob exists, so a viewer is told to come back later or
    go to another node, never that it is missing."""

    code = "r2_budget"
    retry_after_s = 60  # it stays so until the month ends: another node is the better bet
