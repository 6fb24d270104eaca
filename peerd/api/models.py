"""The coordinator contract's data: every request and response body, as pydantic models.

These models are the single source of the OpenAPI document (``peerd.api.openapi``): field
descriptions here become the contract the coordinator is written against. Requests forbid
unknown fields, so a typo in the coordinator fails loudly instead of being ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

CID_PATTERN = r"^bafkrei[a-h][a-z2-7]{50}[aeimquy4]$"
PEER_ID_PATTERN = r"^12D3KooW[1-9A-HJ-NP-Za-km-z]{44}$"
HEX64_PATTERN = r"^[0-9a-f]{64}$"
NONCE_PATTERN = r"^[0-9a-f]{32}$"
MAX_CHALLENGE_BYTES = 4 * 1024 * 1024

CidStr = Annotated[
    str,
    Field(
        pattern=CID_PATTERN,
        description="Content id: CIDv1, raw codec, sha2-256, base32 lower case (`bafkrei...`).",
        examples=["bafkreibnoelefnzgwbcacyt4vh52ymxvzbjq7mmqhtcnwarfq4lzegsiqe"],
    ),
]
PeerIdStr = Annotated[
    str,
    Field(
        pattern=PEER_ID_PATTERN,
        description="libp2p peer id of an ed25519 key (`12D3KooW...`); it embeds the public key.",
    ),
]
JobIdStr = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="Job id (32 hex).")]


class Request(BaseModel):
    """Base of request bodies: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    """Base of response bodies."""

    model_config = ConfigDict(extra="forbid")


# -- errors ----------------------------------------------------------------------------------------


class ErrorBody(Response):
    """Every 4xx/5xx answer of the API."""

    error: str = Field(
        description="Machine code: bad_request, unauthorized, forbidden, not_found, conflict, "
        "not_configured, unavailable, store_full, upstream, integrity, internal."
    )
    message: str = Field(description="Human-readable reason, safe to log.")


# -- node info and health --------------------------------------------------------------------------


class Addresses(Response):
    """Where the node can be reached besides its public URL."""

    lan: list[str] = Field(description="HTTP base URLs on the local network (node to node).")
    libp2p: list[str] = Field(description="libp2p multiaddrs, each ending in `/p2p/<peer id>`.")


class NodeInfo(Response):
    """Who the node is and what it can do (`GET /api/v1/node`)."""

    peer_id: PeerIdStr
    name: str = Field(description="Operator-chosen display name.")
    version: str = Field(description="peerd version.")
    api_version: Literal["1"] = Field(description="Version of this API and of the signed bodies.")
    public_url: str | None = Field(description="Public https base URL (tunnel), if configured.")
    addresses: Addresses
    capabilities: list[str] = Field(
        description="Commands and features this node supports, e.g. `prefetch:r2`, `promote`."
    )
    started_at: float = Field(description="Unix time the daemon started.")
    draining: bool = Field(description="True once the node is stopping.")


class Load(Response):
    """Current serving load."""

    active_streams: int = Field(ge=0, description="Viewer requests being served now.")
    active_streams_measured: bool = Field(
        description="False when the HTTP layer exposes no stream gauge (the value is then 0)."
    )
    egress_bps: float = Field(ge=0, description="Bytes/s served, averaged over ~30 s.")
    egress_measured: bool = Field(description="False until two samples of the byte counter exist.")
    swarm_peer_bytes: int = Field(
        default=0,
        ge=0,
        description="Segment bytes the viewers' players reported getting from other viewers "
        "(the viewer swarm, WebRTC, verified) since the node started: uplink bytes it did not "
        "send.",
    )
    swarm_http_bytes: int = Field(
        default=0,
        ge=0,
        description="Segment bytes the same players reported getting over HTTP since start.",
    )


class Capacity(Response):
    """Room left on this node."""

    disk_free_bytes: int = Field(ge=0, description="Free bytes on the store's file system.")
    disk_total_bytes: int = Field(ge=0, description="Size of the store's file system.")
    store_used_bytes: int = Field(ge=0, description="Bytes of blobs held.")
    store_blobs: int = Field(ge=0, description="Number of blobs held.")
    store_quota_bytes: int = Field(ge=0, description="Store quota; 0 = none (disk reserve only).")
    uplink_bps: int = Field(ge=0, description="Uplink capacity in bytes/s; 0 = unknown.")
    uplink_source: Literal["configured", "unknown"] = Field(
        description="Where uplink_bps comes from (`uplink.budget_mbps` in the config, else "
        "`api.uplink_bps`)."
    )
    spare_uplink_bps: int | None = Field(
        description="uplink_bps minus what the node sends (the admission's send rate when "
        "`uplink.budget_mbps` is set, else egress), floored at 0; null when the uplink is unknown."
    )


class Admission(Response):
    """Uplink admission: whether the node takes on new viewer streams (route new viewers to a
    node in `open`; one in `overflow` sends new streams' segments to the bucket or answers 503)."""

    state: Literal["off", "open", "overflow"] = Field(
        description="off: no uplink budget; open: new streams are served by the node; "
        "overflow: new streams are redirected to R2, or, when R2 cannot take them, served at "
        "their lowest rendition while floor_spare_bps has room for it (else refused with 503)."
    )
    budget_bps: int = Field(ge=0, description="The uplink budget in bytes/s (0 when off).")
    send_bps: int = Field(
        ge=0, description="Bytes/s sent to viewers and peers over the last window."
    )
    spare_bps: int = Field(ge=0, description="budget_bps minus send_bps, floored at 0.")
    streams: int = Field(
        ge=0, description="Viewer streams admitted and active (HLS streams, WHEP sessions)."
    )
    floor_spare_bps: int = Field(
        default=0,
        ge=0,
        description="budget_bps minus the lowest-rendition bit rates of the streams playing, "
        "floored at 0: room for new streams R2 cannot take, served at their lowest rendition.",
    )
    spill: bool = Field(
        default=False,
        description="Whether a stream over the budget can be redirected to the bucket now, as "
        "far as the node knows: R2 is configured and can be linked to (with SSE-C only through "
        "`[r2] public_base_url`), the bucket did not fail a redirect within `retry_after_s`, and "
        "the month's class B budget leaves the HEAD that precedes a redirect. False: a node in "
        "`overflow` can only serve new streams at their floor or refuse them (503); route "
        "viewers of media the bucket holds to the bucket instead.",
    )
    r2_class_b_left: int | None = Field(
        default=None,
        ge=0,
        description="R2 class B requests (GET, HEAD) this month's budget "
        "(`[r2] budget_class_b_per_month`) still allows the node; null without R2.",
    )
    redirects: int = Field(ge=0, description="Requests redirected to the bucket since start.")
    refusals: int = Field(
        ge=0,
        description="Requests refused (503) over budget since start (HLS blob requests the "
        "bucket lacks, WHEP offers).",
    )


class Health(Response):
    """Health and load (`GET /api/v1/health`)."""

    status: Literal["ok", "starting", "draining"]
    draining: bool
    uptime_s: float = Field(ge=0)
    load: Load
    capacity: Capacity
    admission: Admission
    jobs_active: int = Field(ge=0, description="Command jobs queued or running.")


# -- inventory -------------------------------------------------------------------------------------


class InventoryQuery(Request):
    """Query of `GET /api/v1/inventory`."""

    since: int = Field(
        default=0, ge=0, le=2**63 - 1, description="Cursor: return changes with seq > since."
    )
    limit: int = Field(default=500, ge=1, le=1000, description="Most items in one page.")


class InventoryItem(Response):
    """The current state of one blob or media item that changed after the cursor."""

    kind: Literal["blob", "media"]
    id: str = Field(description="Blob cid or media id.")
    seq: int = Field(ge=1, description="Change sequence number of this entry's last change.")
    state: Literal["present", "absent", "deleted"] = Field(
        description="present: held locally; absent: known, bytes not held (e.g. evicted to R2); "
        "deleted: no longer in the catalog. Media items are always present or deleted."
    )
    size: int | None = Field(description="Blob size in bytes (null for media and deleted).")
    blob_kind: str | None = Field(description="init | segment | manifest | other (blobs only).")
    r2_state: str | None = Field(description="none | queued | present | deleting.")
    pinned: bool | None
    title: str | None = Field(description="Media title (media only).")
    duration_s: float | None = Field(description="Media duration (media only).")


class InventorySummary(Response):
    """The cheap sync check: compare `digest` with your own view before paging."""

    digest: str = Field(
        pattern=HEX64_PATTERN,
        description="Sum mod 2^256 of sha256(`blob:<cid>`) over present blobs and "
        "sha256(`media:<id>`) over media, 64 hex digits.",
    )
    count: int = Field(ge=0, description="Number of entries in the digest.")
    seq: int = Field(ge=0, description="Highest change sequence number so far.")


class Inventory(Response):
    """One page of inventory changes (`GET /api/v1/inventory`)."""

    items: list[InventoryItem]
    next_since: int = Field(ge=0, description="Pass as `since` to get the next page.")
    more: bool = Field(description="True if another page follows.")
    summary: InventorySummary


# -- playback analytics (issue 23) -----------------------------------------------------------------

_DIMENSION = r"(hour|media|rendition|codec|path|region)"


class AnalyticsQuery(Request):
    """Query of `GET /api/v1/analytics`."""

    since: int | None = Field(
        default=None,
        ge=0,
        le=2**40,
        description="Unix seconds; the hourly rollup from the hour holding it (default: 24 "
        "hours before `until`).",
    )
    until: int | None = Field(
        default=None, ge=0, le=2**40, description="Unix seconds, up to its hour (default: now)."
    )
    group_by: str = Field(
        default="codec",
        pattern=rf"^{_DIMENSION}(,{_DIMENSION}){{0,5}}$",
        description="Comma-separated dimensions the rows are summed by: hour, media, rendition, "
        "codec (the codec string), path (http, whep, swarm), region.",
    )
    media: str | None = Field(
        default=None,
        pattern=r"^(b[a-z2-7]{58}|live:[a-z0-9][a-z0-9_-]{0,31})$",
        description="A media id, or `live:<input>` for a live input's viewers.",
    )
    rendition: str | None = Field(default=None, max_length=64)
    codec: str | None = Field(default=None, max_length=64)
    path: Literal["http", "whep", "swarm"] | None = None
    region: str | None = Field(default=None, pattern=r"^([A-Z]{2})?$")
    limit: int = Field(default=100, ge=1, le=1000, description="Most rows, most sessions first.")


class AnalyticsRow(Response):
    """Sessions of one group of the rollup. A session counts once, when it started or failed."""

    hour: int | None = Field(default=None, description="Start of the UTC hour (if grouped).")
    media: str | None = None
    rendition: str | None = None
    codec: str | None = None
    path: str | None = None
    region: str | None = Field(default=None, description="CF-IPCountry; empty: unknown.")
    sessions: int = Field(ge=0, description="Sessions that started or failed.")
    started: int = Field(ge=0)
    failures: int = Field(ge=0, description="Sessions that never started playing.")
    success_ratio: float | None = Field(description="started / sessions.")
    stalls: int = Field(ge=0, description="Stalls (CMCD bs, WHEP freezes).")
    stalled_sessions: int = Field(ge=0)
    stall_rate: float | None = Field(description="Stalls per started session.")
    startup_mean_s: float | None = Field(
        description="Mean startup time: first request to the first segment request with media "
        "buffered (CMCD bl > 0), or to the first decoded frame (WHEP)."
    )
    startup_p50_s: float | None = Field(description="Upper bound of the median's bucket.")
    startup_p95_s: float | None


class PlaybackAnomaly(Response):
    """A jump of the failure or stall rate of a codec family in a region over its baseline."""

    at: float = Field(description="Unix time it was raised.")
    kind: Literal["failure", "stall"]
    codec: str = Field(description="Codec family (avc1, hvc1, av01, ...).")
    region: str
    baseline: float = Field(description="Exponentially weighted baseline rate.")
    observed: float = Field(description="The rate in the window that raised it.")
    z: float = Field(description="(observed - baseline) / standard error.")
    sessions: int = Field(ge=0, description="Sessions in the window.")
    explained: str


class AnalyticsBytes(Response):
    """Bytes by source over the range: the node's (local, lan, libp2p, r2, ...) and those the
    swarm players reported (viewer_peer: from other viewers, viewer_http: from the node)."""

    by_source: dict[str, int]
    p2p_share: float | None = Field(
        description="viewer_peer / (viewer_peer + viewer_http): the swarm's savings."
    )


class AnalyticsReport(Response):
    """Playback analytics of the node (`GET /api/v1/analytics`)."""

    since: int
    until: int
    group_by: list[str]
    rows: list[AnalyticsRow]
    bytes: AnalyticsBytes
    anomalies: list[PlaybackAnomaly]


# -- possession challenge --------------------------------------------------------------------------


class ChallengeRequest(Request):
    """Prove the node holds a blob (`POST /api/v1/challenge`)."""

    nonce: str = Field(
        pattern=r"^(?:[0-9a-f]{2}){16,64}$",
        description="16 to 64 random bytes, lowercase hex. Fresh for every challenge.",
    )
    cid: CidStr
    offset: int = Field(ge=0, le=1 << 40, description="First byte of the range.")
    length: int = Field(ge=1, le=MAX_CHALLENGE_BYTES, description="Bytes in the range.")


class ChallengeResponse(Response):
    """The proof. The response body bytes are signed like node reports (see the signature
    headers); `sha256` = sha256(nonce bytes || blob bytes[offset : offset + length])."""

    peer_id: PeerIdStr
    cid: CidStr
    nonce: str
    offset: int = Field(ge=0)
    length: int = Field(ge=1)
    sha256: str = Field(pattern=HEX64_PATTERN)


# -- commands and jobs -----------------------------------------------------------------------------


def _no_nulls(*keys: str) -> Any:
    """A before-validator refusing explicit nulls: the schema says "absent or a value"."""

    def check(data: Any) -> Any:
        if isinstance(data, dict):
            for key in keys:
                if key in data and data[key] is None:
                    raise ValueError(f"{key} must be omitted rather than null")
        return data

    return model_validator(mode="before")(check)


def _schema_extra(extra: dict[str, Any]) -> Any:
    """Add ``extra`` to a model's schema and drop ``default: null`` of optional fields (they
    are "absent or a value", never null)."""

    def apply(schema: dict[str, Any]) -> None:
        for prop in schema.get("properties", {}).values():
            if "default" in prop and prop["default"] is None:
                del prop["default"]
        schema.update(extra)

    return apply


_CID_SCHEMA = {"type": "string", "pattern": CID_PATTERN}
_PEER_SCHEMA = {"type": "string", "pattern": PEER_ID_PATTERN}


class PrefetchRequest(Request):
    """Make a media item local (`POST /api/v1/commands/prefetch`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_schema_extra(
            {
                "if": {"properties": {"source": {"const": "peer"}}, "required": ["source"]},
                "then": {"required": ["peer_id"]},
                "else": {"not": {"required": ["peer_id"]}},
            }
        ),
    )
    _nulls = _no_nulls("peer_id")

    media_id: CidStr
    source: Literal["r2", "peer", "any"] = Field(
        default="any",
        description="r2: pull manifest and blobs from R2; peer: from `peer_id` (LAN/libp2p); "
        "any: the node's delivery order (local, LAN, libp2p, R2), for the manifest too when "
        "the catalog lacks it (404 if no source has it).",
    )
    peer_id: Annotated[str | None, WithJsonSchema(_PEER_SCHEMA)] = Field(
        default=None,
        pattern=PEER_ID_PATTERN,
        description="The peer to fetch from; required with source=peer, refused otherwise.",
    )

    @model_validator(mode="after")
    def _peer_needs_id(self) -> PrefetchRequest:
        if (self.source == "peer") != (self.peer_id is not None):
            raise ValueError("peer_id is required with source=peer and only then")
        return self


class MediaCommand(Request):
    """A command on one media item (pin, unpin, promote)."""

    media_id: CidStr


class IngestRequest(Request):
    """Package a file or folder of the node's library (`POST /api/v1/commands/ingest`).

    `path` is absolute and must lie inside one of the node's library folders (`[media]
    library_dirs` or `watch_dirs`); a folder is ingested file by file, errors not stopping the
    rest. `force` re-packages files whose content was ingested before."""

    path: str = Field(min_length=1, max_length=4096, pattern=r"^/")
    force: bool = False


class EvictRequest(Request):
    """Drop local copies (`POST /api/v1/commands/evict`). Only blobs whose R2 copy is confirmed
    (`r2_state` = present) and that are not pinned leave the disk; others are kept and counted.
    Give exactly one of `media_id` and `cids`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_schema_extra(
            {
                "oneOf": [
                    {"required": ["media_id"], "not": {"required": ["cids"]}},
                    {"required": ["cids"], "not": {"required": ["media_id"]}},
                ]
            }
        ),
    )
    _nulls = _no_nulls("media_id", "cids")

    media_id: Annotated[str | None, WithJsonSchema(_CID_SCHEMA)] = Field(
        default=None, pattern=CID_PATTERN, description="Evict this media item's blobs."
    )
    cids: Annotated[
        list[CidStr] | None,
        WithJsonSchema({"type": "array", "items": _CID_SCHEMA, "minItems": 1, "maxItems": 1000}),
    ] = Field(default=None, min_length=1, max_length=1000, description="Or: these blobs.")

    @model_validator(mode="after")
    def _one_target(self) -> EvictRequest:
        if (self.media_id is None) == (self.cids is None):
            raise ValueError("give exactly one of media_id and cids")
        return self


class JobStatus(Response):
    """A command job (`GET /api/v1/jobs/{job_id}`, and the 202 answer of every command)."""

    job_id: JobIdStr
    kind: Literal["prefetch", "pin", "unpin", "evict", "promote", "ingest"]
    target: str = Field(
        description="Media id, `cids:<sha256 of the sorted cid list>` (evict), or the absolute "
        "path (ingest)."
    )
    state: Literal["queued", "running", "done", "failed"]
    progress: float = Field(ge=0, le=1)
    created_at: float
    updated_at: float
    result: dict[str, Any] | None = Field(description="Command-specific counts, when done.")
    error: str | None = Field(description="Why it failed, when failed.")


class LiveHandoff(Response):
    """One live input's hand-off to Cloudflare Stream (`[live.handoff]`)."""

    input: str = Field(description="The live input (`[live] inputs` name).")
    handed_off: bool = Field(
        description="The input is being restreamed to Stream: send its new viewers to playback_url."
    )
    since: float | None = Field(description="Unix time the hand-off started; null when not.")
    stream_uid: str | None = Field(description="The Stream live input it uses (kept after).")
    playback_url: str | None = Field(
        description="Stream's HLS manifest of the input while handed off "
        "(`https://customer-<code>.cloudflarestream.com/<uid>/manifest/video.m3u8`)."
    )
    egress: Literal["off", "connecting", "sending", "retrying"] = Field(
        description="The RTMPS restream: sending once Stream takes the frames; retrying after "
        "a failure (with backoff)."
    )
    failures: int = Field(ge=0, description="Restream connections failed in this hand-off.")


# -- node -> coordinator (signed) ------------------------------------------------------------------


class LiveInput(Response):
    """One configured live input (`GET /api/v1/live`, the heartbeat's `live`)."""

    input: str = Field(description="The input's name, as configured (`[live] inputs`).")
    connected: bool = Field(description="A publisher is connected now.")
    since: float | None = Field(description="Unix time the publisher connected; null if none.")
    protocol: Literal["rtmp", "rtmps", "whip"] | None = Field(
        description="How the publisher connected; null if none."
    )
    remote: str | None = Field(description="The publisher's IP address (no port); null if none.")
    codecs: list[str] = Field(description="RFC 6381 codec of each track (`avc1.640028`, ...).")
    bitrate_bps: int = Field(ge=0, description="Bits/s received over the last 5 s.")
    viewers: int = Field(ge=0, description="Viewers now (LL-HLS and WHEP).")
    latency_s: float | None = Field(
        description="The node's share of an LL-HLS viewer's glass-to-glass latency, seconds: the "
        "age of the playlist's live edge plus PART-HOLD-BACK; null while not live."
    )
    last_recording: CidStr | None = Field(
        description="Media id of the input's last recording (a normal media item); null if none."
    )
    record: bool = Field(description="Publications of this input are recorded.")


class LiveStatus(Response):
    """The node's live inputs (`GET /api/v1/live`)."""

    inputs: list[LiveInput]


class NodeReport(Response):
    """Body the node POSTs to the coordinator: `/v1/nodes/register`, `/v1/nodes/heartbeat` and
    `/v1/nodes/drain`. Signed: the exact body bytes carry an ed25519 signature in
    `X-Peerd-Signature` (base64url, no padding) by the key embedded in `X-Peerd-Peer-Id`."""

    kind: Literal["register", "heartbeat", "drain"]
    peer_id: PeerIdStr
    name: str
    version: str
    api_version: Literal["1"]
    public_url: str | None
    addresses: Addresses
    capabilities: list[str]
    capacity: Capacity
    load: Load
    admission: Admission
    inventory: InventorySummary
    # Left out of the body when there is none: coordinators that predate it see what they know.
    anomalies: list[PlaybackAnomaly] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Playback anomalies raised since the last report (optional).",
    )
    draining: bool
    drain_deadline_s: float | None = Field(
        description="Seconds until the node exits (drain only; null otherwise)."
    )
    live_handoff: list[LiveHandoff] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Live inputs being published and their hand-off to Cloudflare Stream; "
        "absent when `[live.handoff]` is off.",
    )
    timestamp: float = Field(description="Unix time of signing; refused outside +-60 s.")
    nonce: str = Field(pattern=NONCE_PATTERN, description="16 random bytes; refused if reused.")
    live: list[LiveInput] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="The node's live inputs, as `GET /api/v1/live` reports them; absent on a "
        "node with none. A connect or drop sends a heartbeat at once.",
    )


class CoordinatorReply(BaseModel):
    """What the coordinator answers to a node report (2xx). Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    accepted: bool = True
    heartbeat_interval_s: float | None = Field(
        default=None, ge=5, le=3600, description="Asks the node to change its heartbeat interval."
    )
    reregister: bool = Field(
        default=False, description="True if the coordinator lost the node's registration."
    )
