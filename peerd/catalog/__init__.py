"""The catalog: SQLite (WAL) through aiosqlite, schema as numbered SQL migrations.

Tables (see ``migrations/0001_init.sql``): ``media``, ``renditions``, ``segments`` (what a media
item is made of), ``blobs`` (local and R2 state of every content id, size, access score, pin),
``replication_jobs`` (the durable outbox), ``peers`` and ``usage`` (counters by day).
"""

from peerd.catalog.db import BlobRow, Catalog

__all__ = ["BlobRow", "Catalog"]
