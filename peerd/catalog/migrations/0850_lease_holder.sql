-- Issue 19: a lease names the process that holds it (boot id, pid, process start time), so a
-- worker reclaims at once the jobs of a process that is gone (killed, or from before a reboot)
-- instead of waiting for the lease to expire.
ALTER TABLE replication_jobs ADD COLUMN lease_boot TEXT;
ALTER TABLE replication_jobs ADD COLUMN lease_pid INTEGER;
ALTER TABLE replication_jobs ADD COLUMN lease_started INTEGER;
-- The latest job of a (kind, target): failed-job retries, the exit status of a push, and a
-- manifest that must know whether its blobs' uploads gave up.
CREATE INDEX replication_jobs_target ON replication_jobs(kind, target, id);
