-- Issue 7: change sequence for the coordinator's inventory sync, and the API's command jobs.

-- One row per blob or media id ever seen; seq is bumped on every change that matters to the
-- coordinator (insert, delete, local_state, r2_state, pinned). Rows of deleted things stay as
-- tombstones so a coordinator syncing with `since` learns about deletions too.
CREATE TABLE inventory_seq (
    kind         TEXT NOT NULL,             -- blob | media
    id           TEXT NOT NULL,
    seq          INTEGER NOT NULL UNIQUE,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;

-- The last sequence number handed out. A separate counter (not MAX(seq) + 1) keeps numbers
-- strictly increasing even when the entry holding the maximum changes again. The triggers use
-- plain UPDATE/INSERT ... WHERE NOT EXISTS, never a conflict clause: an outer UPSERT (the blob
-- store's INSERT ... ON CONFLICT) would override a trigger's OR REPLACE.
CREATE TABLE inventory_counter (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    seq          INTEGER NOT NULL
);

INSERT INTO inventory_seq(kind, id, seq)
    SELECT 'media', media_id, ROW_NUMBER() OVER (ORDER BY created_at, media_id) FROM media;
INSERT INTO inventory_seq(kind, id, seq)
    SELECT 'blob', cid,
           (SELECT COALESCE(MAX(seq), 0) FROM inventory_seq)
           + ROW_NUMBER() OVER (ORDER BY created_at, cid)
    FROM blobs;
INSERT INTO inventory_counter(id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM inventory_seq;

CREATE TRIGGER inventory_blob_ins AFTER INSERT ON blobs
BEGIN
    UPDATE inventory_counter SET seq = seq + 1;
    UPDATE inventory_seq SET seq = (SELECT seq FROM inventory_counter)
        WHERE kind = 'blob' AND id = NEW.cid;
    INSERT INTO inventory_seq(kind, id, seq)
        SELECT 'blob', NEW.cid, (SELECT seq FROM inventory_counter)
        WHERE NOT EXISTS (SELECT 1 FROM inventory_seq WHERE kind = 'blob' AND id = NEW.cid);
END;

CREATE TRIGGER inventory_blob_upd AFTER UPDATE OF local_state, r2_state, pinned, size ON blobs
    WHEN OLD.local_state IS NOT NEW.local_state OR OLD.r2_state IS NOT NEW.r2_state
      OR OLD.pinned IS NOT NEW.pinned OR OLD.size IS NOT NEW.size
BEGIN
    UPDATE inventory_counter SET seq = seq + 1;
    UPDATE inventory_seq SET seq = (SELECT seq FROM inventory_counter)
        WHERE kind = 'blob' AND id = NEW.cid;
    INSERT INTO inventory_seq(kind, id, seq)
        SELECT 'blob', NEW.cid, (SELECT seq FROM inventory_counter)
        WHERE NOT EXISTS (SELECT 1 FROM inventory_seq WHERE kind = 'blob' AND id = NEW.cid);
END;

CREATE TRIGGER inventory_blob_del AFTER DELETE ON blobs
BEGIN
    UPDATE inventory_counter SET seq = seq + 1;
    UPDATE inventory_seq SET seq = (SELECT seq FROM inventory_counter)
        WHERE kind = 'blob' AND id = OLD.cid;
    INSERT INTO inventory_seq(kind, id, seq)
        SELECT 'blob', OLD.cid, (SELECT seq FROM inventory_counter)
        WHERE NOT EXISTS (SELECT 1 FROM inventory_seq WHERE kind = 'blob' AND id = OLD.cid);
END;

CREATE TRIGGER inventory_media_ins AFTER INSERT ON media
BEGIN
    UPDATE inventory_counter SET seq = seq + 1;
    UPDATE inventory_seq SET seq = (SELECT seq FROM inventory_counter)
        WHERE kind = 'media' AND id = NEW.media_id;
    INSERT INTO inventory_seq(kind, id, seq)
        SELECT 'media', NEW.media_id, (SELECT seq FROM inventory_counter)
        WHERE NOT EXISTS (SELECT 1 FROM inventory_seq WHERE kind = 'media' AND id = NEW.media_id);
END;

CREATE TRIGGER inventory_media_upd AFTER UPDATE OF pinned, r2_state, title ON media
    WHEN OLD.pinned IS NOT NEW.pinned OR OLD.r2_state IS NOT NEW.r2_state
      OR OLD.title IS NOT NEW.title
BEGIN
    UPDATE inventory_counter SET seq = seq + 1;
    UPDATE inventory_seq SET seq = (SELECT seq FROM inventory_counter)
        WHERE kind = 'media' AND id = NEW.media_id;
    INSERT INTO inventory_seq(kind, id, seq)
        SELECT 'media', NEW.media_id, (SELECT seq FROM inventory_counter)
        WHERE NOT EXISTS (SELECT 1 FROM inventory_seq WHERE kind = 'media' AND id = NEW.media_id);
END;

CREATE TRIGGER inventory_media_del AFTER DELETE ON media
BEGIN
    UPDATE inventory_counter SET seq = seq + 1;
    UPDATE inventory_seq SET seq = (SELECT seq FROM inventory_counter)
        WHERE kind = 'media' AND id = OLD.media_id;
    INSERT INTO inventory_seq(kind, id, seq)
        SELECT 'media', OLD.media_id, (SELECT seq FROM inventory_counter)
        WHERE NOT EXISTS (SELECT 1 FROM inventory_seq WHERE kind = 'media' AND id = OLD.media_id);
END;

-- Commands the coordinator sent (prefetch, pin, unpin, evict, promote), run as jobs it polls.
CREATE TABLE api_jobs (
    job_id       TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,             -- prefetch | pin | unpin | evict | promote
    target       TEXT NOT NULL,             -- media id, or a digest of the cid list (evict)
    params       TEXT NOT NULL,             -- the request body, JSON
    state        TEXT NOT NULL,             -- queued | running | done | failed
    progress     REAL NOT NULL DEFAULT 0,   -- 0..1
    result       TEXT,                      -- JSON, when done
    error        TEXT,                      -- message, when failed
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
) WITHOUT ROWID;
-- At most one open job per command and target: asking twice returns the running job.
CREATE UNIQUE INDEX api_jobs_open ON api_jobs(kind, target) WHERE state IN ('queued', 'running');
CREATE INDEX api_jobs_updated ON api_jobs(updated_at);
