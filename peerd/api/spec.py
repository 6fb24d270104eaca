"""The table of API endpoints: one row per operation, read by the routes and the OpenAPI generator.

Routes (``peerd.api.routes``) register exactly these rows and the generator
(``peerd.api.openapi``) documents exactly these rows, so the served API and the document cannot
drift apart; a test checks that every row has a handler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from peerd.api import models as m

PREFIX = "/api/v1"
AUTH_ERRORS = (400, 401, 403)


@dataclass(frozen=True)
class Endpoint:
    """One operation of the API."""

    method: str
    path: str
    operation_id: str
    summary: str
    description: str
    response: type[BaseModel]
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path_params: tuple[tuple[str, str], ...] = ()
    errors: tuple[int, ...] = AUTH_ERRORS
    signed: bool = False
    tags: tuple[str, ...] = field(default=("node",))


_COMMAND_ERRORS = (*AUTH_ERRORS, 404, 409, 503)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/node",
        "getNode",
        "Node info",
        "Peer id, version, public URL, addresses and capabilities of the node.",
        m.NodeInfo,
    ),
    Endpoint(
        "GET",
        "/health",
        "getHealth",
        "Health and load",
        "Status, active streams, egress, spare uplink, disk and store figures, active jobs.",
        m.Health,
    ),
    Endpoint(
        "GET",
        "/inventory",
        "getInventory",
        "Inventory changes",
        "Blobs and media items that changed after the `since` cursor, in change order, with "
        "the inventory digest. Start at since=0 and follow `next_since` while `more` is true.",
        m.Inventory,
        query=m.InventoryQuery,
        tags=("inventory",),
    ),
    Endpoint(
        "POST",
        "/challenge",
        "postChallenge",
        "Possession challenge",
        "Answers sha256(nonce || bytes[offset:offset+length]) of a held blob. The response "
        "body is signed by the node key (headers X-Peerd-Peer-Id, X-Peerd-Signature). Unknown "
        "or not-held blob: 404; a range past the blob's end: 416.",
        m.ChallengeResponse,
        body=m.ChallengeRequest,
        errors=(*AUTH_ERRORS, 404, 416),
        signed=True,
        tags=("inventory",),
    ),
    Endpoint(
        "POST",
        "/commands/prefetch",
        "postPrefetch",
        "Prefetch a media item",
        "Makes a media item local from R2, a named peer, or the delivery order. Returns a job.",
        m.JobStatus,
        status=202,
        body=m.PrefetchRequest,
        errors=_COMMAND_ERRORS,
        tags=("commands",),
    ),
    Endpoint(
        "POST",
        "/commands/pin",
        "postPin",
        "Pin a media item",
        "Marks the item and its blobs pinned: never evicted. Returns a job.",
        m.JobStatus,
        status=202,
        body=m.MediaCommand,
        errors=_COMMAND_ERRORS,
        tags=("commands",),
    ),
    Endpoint(
        "POST",
        "/commands/unpin",
        "postUnpin",
        "Unpin a media item",
        "Clears the pin; blobs shared with another pinned item stay pinned. Returns a job.",
        m.JobStatus,
        status=202,
        body=m.MediaCommand,
        errors=_COMMAND_ERRORS,
        tags=("commands",),
    ),
    Endpoint(
        "POST",
        "/commands/evict",
        "postEvict",
        "Evict local copies",
        "Drops local copies of blobs whose R2 copy is confirmed and that are not pinned; never "
        "the last copy. Returns a job whose result counts evicted and kept blobs.",
        m.JobStatus,
        status=202,
        body=m.EvictRequest,
        errors=_COMMAND_ERRORS,
        tags=("commands",),
    ),
    Endpoint(
        "POST",
        "/commands/promote",
        "postPromote",
        "Promote a media item to R2",
        "Uploads the item's blobs and manifest to R2; the job finishes when R2 holds them all.",
        m.JobStatus,
        status=202,
        body=m.MediaCommand,
        errors=_COMMAND_ERRORS,
        tags=("commands",),
    ),
    Endpoint(
        "POST",
        "/commands/ingest",
        "postIngest",
        "Ingest from the library",
        "Packages a file (or every media file of a folder) inside the node's library folders "
        "into content-addressed HLS and adds it to the catalog. Path outside the library: 403; "
        "no library folder configured: 409. Returns a job whose result names the media ids.",
        m.JobStatus,
        status=202,
        body=m.IngestRequest,
        errors=_COMMAND_ERRORS,
        tags=("commands",),
    ),
    Endpoint(
        "GET",
        "/live",
        "getLive",
        "Live inputs",
        "Every configured live input: connected or not and since when, protocol, the "
        "publisher's address, codecs, bitrate, viewers, latency if known, and the media id of "
        "its last recording.",
        m.LiveStatus,
        tags=("live",),
    ),
    Endpoint(
        "GET",
        "/jobs/{job_id}",
        "getJob",
        "Job status",
        "State, progress and result of a command job. Jobs survive restarts of the node (open "
        "ones become failed: interrupted by restart).",
        m.JobStatus,
        path_params=(("job_id", r"^[0-9a-f]{32}$"),),
        errors=(*AUTH_ERRORS, 404),
        tags=("commands",),
    ),
    Endpoint(
        "GET",
        "/analytics",
        "getAnalytics",
        "Playback analytics",
        "Sessions, startup times, stalls and failures of the node's viewers (from the CMCD "
        "their players send and WHEP statistics) summed over the hourly rollup by the "
        "dimensions in `group_by`, bytes by source, and the anomalies raised in the range. "
        "409 when `[analytics] enabled` is false.",
        m.AnalyticsReport,
        query=m.AnalyticsQuery,
        errors=(*AUTH_ERRORS, 409),
        tags=("analytics",),
    ),
)
