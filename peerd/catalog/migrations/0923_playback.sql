-- Issue 23: playback analytics. Counts of viewer sessions by UTC hour and dimensions (media,
-- rendition, codec string, delivery path, region), added to as they happen
-- (peerd.core.analytics.Bucket; h0..h6 is the startup histogram, bounds STARTUP_BOUNDS), bytes
-- served by source per hour, and the anomalies raised. Rows older than
-- [analytics] retention_days are deleted.
CREATE TABLE playback_hourly (
    hour INTEGER NOT NULL,
    media TEXT NOT NULL,
    rendition TEXT NOT NULL,
    codec TEXT NOT NULL,
    path TEXT NOT NULL,
    region TEXT NOT NULL,
    sessions INTEGER NOT NULL DEFAULT 0,
    started INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    stalls INTEGER NOT NULL DEFAULT 0,
    stalled_sessions INTEGER NOT NULL DEFAULT 0,
    startup_sum REAL NOT NULL DEFAULT 0,
    h0 INTEGER NOT NULL DEFAULT 0,
    h1 INTEGER NOT NULL DEFAULT 0,
    h2 INTEGER NOT NULL DEFAULT 0,
    h3 INTEGER NOT NULL DEFAULT 0,
    h4 INTEGER NOT NULL DEFAULT 0,
    h5 INTEGER NOT NULL DEFAULT 0,
    h6 INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, media, rendition, codec, path, region)
) WITHOUT ROWID;
CREATE TABLE playback_bytes (
    hour INTEGER NOT NULL,
    source TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, source)
) WITHOUT ROWID;
CREATE TABLE playback_anomalies (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    codec TEXT NOT NULL,
    region TEXT NOT NULL,
    baseline REAL NOT NULL,
    observed REAL NOT NULL,
    z REAL NOT NULL,
    sessions INTEGER NOT NULL
);
CREATE INDEX playback_anomalies_at ON playback_anomalies(at);
