-- peerd catalog, version 1.

CREATE TABLE media (
    media_id     TEXT PRIMARY KEY,          -- CID of the canonical manifest
    title        TEXT NOT NULL DEFAULT '',
    source_path  TEXT,                      -- file it was ingested from (NULL if pulled)
    source_sig   TEXT,                      -- size:mtime_ns of that file, to skip unchanged files
    manifest     BLOB NOT NULL,             -- canonical manifest JSON bytes
    duration_s   REAL NOT NULL,
    created_at   REAL NOT NULL,
    pinned       INTEGER NOT NULL DEFAULT 0,
    r2_state     TEXT NOT NULL DEFAULT 'none'   -- none | queued | present | deleting
);
CREATE INDEX media_source ON media(source_path);

CREATE TABLE renditions (
    media_id     TEXT NOT NULL REFERENCES media(media_id) ON DELETE CASCADE,
    rendition_id TEXT NOT NULL,
    position     INTEGER NOT NULL,
    kind         TEXT NOT NULL,             -- video | audio
    container    TEXT NOT NULL,             -- fmp4 | ts
    codecs       TEXT NOT NULL,
    bandwidth    INTEGER NOT NULL,
    width        INTEGER,
    height       INTEGER,
    init_cid     TEXT,
    produced     INTEGER NOT NULL DEFAULT 1, -- 0: in the ladder, made on demand
    PRIMARY KEY (media_id, rendition_id)
);

CREATE TABLE segments (
    media_id     TEXT NOT NULL,
    rendition_id TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    duration_s   REAL NOT NULL,
    cid          TEXT,                      -- NULL until produced (on-demand renditions)
    PRIMARY KEY (media_id, rendition_id, seq),
    FOREIGN KEY (media_id, rendition_id) REFERENCES renditions(media_id, rendition_id)
        ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX segments_cid ON segments(cid);

CREATE TABLE blobs (
    cid          TEXT PRIMARY KEY,
    size         INTEGER NOT NULL,
    kind         TEXT NOT NULL DEFAULT 'segment',  -- init | segment | manifest | other
    local_state  TEXT NOT NULL DEFAULT 'present',  -- present | absent
    r2_state     TEXT NOT NULL DEFAULT 'none',     -- none | queued | present | deleting
    r2_checked_at REAL,
    access_score REAL NOT NULL DEFAULT 0,
    last_access  REAL,
    pinned       INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX blobs_local ON blobs(local_state);

CREATE TABLE replication_jobs (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,             -- push_blob | push_manifest | pull_media | delete_blob
    target       TEXT NOT NULL,             -- cid or media id
    state        TEXT NOT NULL DEFAULT 'queued',  -- queued | running | done | failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_until  REAL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE UNIQUE INDEX replication_jobs_open ON replication_jobs(kind, target)
    WHERE state IN ('queued', 'running');
CREATE INDEX replication_jobs_due ON replication_jobs(state, next_attempt_at);

CREATE TABLE peers (
    peer_id      TEXT PRIMARY KEY,
    via          TEXT NOT NULL,             -- mdns | libp2p | coordinator
    http_url     TEXT,
    addrs        TEXT NOT NULL DEFAULT '[]', -- JSON list of multiaddrs / URLs
    version      TEXT,
    first_seen   REAL NOT NULL,
    last_seen    REAL NOT NULL,
    rtt_ms       REAL,
    failures     INTEGER NOT NULL DEFAULT 0,
    banned_until REAL
);

CREATE TABLE usage (
    day          TEXT NOT NULL,             -- YYYY-MM-DD (UTC)
    metric       TEXT NOT NULL,             -- e.g. bytes_served
    label        TEXT NOT NULL DEFAULT '',  -- e.g. source=lan
    value        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, metric, label)
) WITHOUT ROWID;

CREATE TABLE node_state (
    key          TEXT PRIMARY KEY,
    value        TEXT NOT NULL
);
