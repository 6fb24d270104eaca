"""The catalog: SQLite (WAL) through aiosqlite, schema as numbered SQL migrations.

Tables (see ``migrations/0001_init.sql``): ``media``, ``renditions``, ``segments`` (what a media
item is made of), ``blobs`` (local and R2 state of every content id, size, access score, pin),
``replication_jobs`` (the durable outbox), ``peers`` and ``usage`` (counters by day).

The SQL lives here, beside the schema: :mod:`~peerd.catalog.db` (connections, migrations, the
``blobs`` table), :mod:`~peerd.catalog.media`, :mod:`~peerd.catalog.jobs` (``api_jobs``),
:mod:`~peerd.catalog.inventory`, :mod:`~peerd.catalog.peers`, :mod:`~peerd.catalog.outbox` and
:mod:`~peerd.catalog.usage`; other packages call their typed functions.
"""

from peerd.catalog.db import BlobRow, Catalog

__all__ = ["BlobRow", "Catalog"]
