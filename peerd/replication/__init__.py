"""R2 replication, read-through and tiering.

The node's R2 bucket is the hot tier. This package holds

- :mod:`.r2` -- the S3 client configured for R2 (checksums, key layout, read retries); every
  request goes through :mod:`.s3http` (one aiohttp session, SigV4 from botocore's signer);
- :mod:`.service` -- :class:`Replicator`: workers of the durable outbox
  (:mod:`peerd.catalog.outbox`), promote/demote/pull, last-copy upload;
- :mod:`.source` -- :class:`R2Source`, R2 as a delivery source (read-through);
- :mod:`.tiering` -- :class:`TieringService`: access folding, policy, local eviction;
- :mod:`.uploads` -- :class:`Uploads`: media entering through bucket uploads (claims in
  :mod:`peerd.core.uploads`), ``peerd ingest --from-bucket`` and ``[r2] watch_uploads``;
- :mod:`.cli` -- ``peerd replicate push|pull|status``.

The daemon (:func:`peerd.daemon.build_services`) builds the client, the R2 source, the
replicator and tiering when R2 is configured (:func:`.r2.config_from_settings`); without it the
node runs without R2.
"""
