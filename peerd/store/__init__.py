"""The content-addressed blob store.

Blob bytes live in files ``<state>/blobs/<shard>/<cid>`` (shard = first byte of the digest in
hex), served with sendfile; the catalog's ``blobs`` table says what is held.

Durability, in this order, so that a crash at any moment leaves nothing half-written:

write
    temp file ``.tmp-*`` in the shard directory, fsync, rename to the final name, fsync the
    directory, then commit the row;
batch write
    (:class:`BlobBatch`, used by ingest) every blob to a temp file
    and fsynced as it comes; at the commit all renamed, each touched shard directory fsynced
    once, then all rows committed in one transaction;
delete
    delete the row, then unlink the file;
recovery
    after an unclean stop, remove temp files and files with no row; rows whose file is missing
    become ``absent`` (re-fetched on demand). After a clean stop only the (cheap) check of the
    shutdown marker runs, so start-up stays fast with millions of rows.
"""

from peerd.store.blobs import BlobBatch, BlobStore, RecoveryReport, VerifyReport, hash_file

__all__ = ["BlobBatch", "BlobStore", "RecoveryReport", "VerifyReport", "hash_file"]
