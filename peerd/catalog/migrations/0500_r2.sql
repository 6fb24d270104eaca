-- Issue 5: R2 replication outbox and tiering.
-- Outbox leases carry an owner token, so a worker whose lease expired (and was re-claimed by
-- another worker or process) cannot complete or fail a job it no longer owns.
ALTER TABLE replication_jobs ADD COLUMN lease_owner TEXT;
-- Jobs enqueued together (one promotion of a media item) share a batch id for status queries.
ALTER TABLE replication_jobs ADD COLUMN batch_id TEXT;
ALTER TABLE replication_jobs ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
CREATE INDEX replication_jobs_batch ON replication_jobs(batch_id) WHERE batch_id IS NOT NULL;
-- When the media item was last put in R2 (promotion hysteresis).
ALTER TABLE media ADD COLUMN r2_since REAL;
-- Eviction and last-copy uploads look blobs up by R2 state.
CREATE INDEX blobs_r2 ON blobs(r2_state, local_state);
