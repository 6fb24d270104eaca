"""Catalog connection, migrations and the blob table's queries.

The other tables' queries live beside this module, one module per concern (see the package).

Two aiosqlite connections to one WAL database: a writer, used only inside
:meth:`Catalog.transaction` (serialised by a lock, ``BEGIN IMMEDIATE``), and a reader for everything
else, so reads never see a transaction that has not committed. ``synchronous=FULL``: a committed
row survives power loss, which the durability rules rely on (a blob row is only committed after
its file is fsynced).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from peerd.core.ids import Cid

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
    "PRAGMA temp_store=MEMORY",
)


@dataclass(frozen=True)
class Migration:
    """One numbered schema step."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The packaged ``NNNN_name.sql`` files, in version order."""
    out = []
    folder = resources.files("peerd.catalog") / "migrations"
    for entry in folder.iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        number, _, rest = name.partition("_")
        if not number.isdigit():
            raise ValueError(f"migration file without a number: {name}")
        out.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text("utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration numbers: {versions}")
    return out


@dataclass(frozen=True)
class BlobRow:
    """A row of the ``blobs`` table."""

    cid: Cid
    size: int
    kind: str
    local_state: str
    r2_state: str
    pinned: bool
    access_score: float
    last_access: float | None
    created_at: float


_BLOB_COLS = "cid, size, kind, local_state, r2_state, pinned, access_score, last_access, created_at"


def _blob(row: aiosqlite.Row | tuple[object, ...]) -> BlobRow:
    r = tuple(row)
    return BlobRow(
        cid=Cid(str(r[0])),
        size=int(r[1]),
        kind=str(r[2]),
        local_state=str(r[3]),
        r2_state=str(r[4]),
        pinned=bool(r[5]),
        access_score=float(r[6]),
        last_access=None if r[7] is None else float(r[7]),
        created_at=float(r[8]),
    )


Row = dict[str, Any]
"""A row by column name: the dashboard's read-outs, rendered to JSON as they are."""


async def named_rows(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> list[Row]:
    """Every row of ``sql`` as a :data:`Row`."""
    async with conn.execute(sql, tuple(params)) as cur:
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


class Catalog:
    """The node's catalog database."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self.writer = writer
        self.conn = reader
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Catalog:
        """Open (creating if needed) and migrate the catalog at ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            for pragma in _PRAGMAS:
                await writer.execute(pragma)
            await migrate(writer)
            reader = await aiosqlite.connect(path, isolation_level=None)
        except BaseException:
            await writer.close()
            raise
        for pragma in _PRAGMAS[1:]:
            await reader.execute(pragma)
        return cls(path, writer, reader)

    async def close(self) -> None:
        """Close both connections (checkpointing the WAL)."""
        await self.conn.close()
        async with self._lock:
            await self.writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on error.

        Cancellation during the body rolls back too; the lock makes transactions from concurrent
        tasks run one after another.
        """
        async with self._lock:
            await self.writer.execute("BEGIN IMMEDIATE")
            try:
                yield self.writer
            except BaseException:
                await asyncio.shield(self.writer.execute("ROLLBACK"))
                raise
            else:
                await asyncio.shield(self.writer.execute("COMMIT"))

    # -- node state (small key/value facts about this node) -------------------------------------

    async def get_state(self, key: str) -> str | None:
        """A node_state value."""
        async with self.conn.execute("SELECT value FROM node_state WHERE key=?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_state(self, key: str, value: str) -> None:
        """Set a node_state value."""
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT INTO node_state(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    # -- blobs ----------------------------------------------------------------------------------

    async def get_blob(self, cid: str) -> BlobRow | None:
        """The blob row for ``cid``, if any."""
        async with self.conn.execute(f"SELECT {_BLOB_COLS} FROM blobs WHERE cid=?", (cid,)) as cur:  # noqa: S608
            row = await cur.fetchone()
        return None if row is None else _blob(row)

    async def get_blobs(self, cids: Iterable[str]) -> dict[Cid, BlobRow]:
        """Rows for many cids at once (missing ones are absent from the result)."""
        out: dict[Cid, BlobRow] = {}
        batch = list(cids)
        for i in range(0, len(batch), 500):
            part = batch[i : i + 500]
            marks = ",".join("?" * len(part))
            sql = f"SELECT {_BLOB_COLS} FROM blobs WHERE cid IN ({marks})"  # noqa: S608
            async with self.conn.execute(sql, part) as cur:
                for row in await cur.fetchall():
                    b = _blob(row)
                    out[b.cid] = b
        return out

    @staticmethod
    async def put_blob_row(
        tx: aiosqlite.Connection, cid: Cid, size: int, kind: str, now: float
    ) -> None:
        """Insert a present blob, or mark an existing row present again (inside ``tx``)."""
        await Catalog.put_blob_rows(tx, [(cid, size, kind)], now)

    @staticmethod
    async def put_blob_rows(
        tx: aiosqlite.Connection, rows: Iterable[tuple[Cid, int, str]], now: float
    ) -> None:
        """:meth:`put_blob_row` for many ``(cid, size, kind)`` at once (inside ``tx``)."""
        await tx.executemany(
            "INSERT INTO blobs(cid, size, kind, local_state, created_at) "
            "VALUES(?, ?, ?, 'present', ?) "
            "ON CONFLICT(cid) DO UPDATE SET local_state='present', size=excluded.size",
            [(cid, size, kind, now) for cid, size, kind in rows],
        )

    async def add_blob(self, cid: Cid, size: int, kind: str, now: float | None = None) -> None:
        """Commit a present blob row."""
        async with self.transaction() as tx:
            await self.put_blob_row(tx, cid, size, kind, time.time() if now is None else now)

    async def mark_absent(self, cids: Iterable[str]) -> int:
        """Mark rows whose file is gone as ``absent`` (re-fetched on demand)."""
        batch = list(cids)
        async with self.transaction() as tx:
            for i in range(0, len(batch), 500):
                part = batch[i : i + 500]
                marks = ",".join("?" * len(part))
                await tx.execute(
                    f"UPDATE blobs SET local_state='absent' WHERE cid IN ({marks})",  # noqa: S608
                    part,
                )
        return len(batch)

    async def delete_blob_row(self, cid: str) -> bool:
        """Delete the row; True if one existed."""
        async with self.transaction() as tx:
            cur = await tx.execute("DELETE FROM blobs WHERE cid=?", (cid,))
            return cur.rowcount > 0

    async def evict_row(self, cid: str) -> bool:
        """Mark a blob ``absent`` only if R2 holds it and it is not pinned; True if it was.

        The condition is checked in the ``UPDATE`` itself, so a concurrent pin or R2 state change
        cannot slip in between a read and this write: the last copy never leaves.
        """
        async with self.transaction() as tx:
            cur = await tx.execute(
                "UPDATE blobs SET local_state='absent' WHERE cid=? "
                "AND local_state='present' AND r2_state='present' AND pinned=0",
                (cid,),
            )
            return cur.rowcount > 0

    @staticmethod
    async def set_blob_r2(
        tx: aiosqlite.Connection,
        cid: str,
        state: str,
        now: float,
        *,
        only_from: tuple[str, ...] = (),
        held: bool = False,
    ) -> bool:
        """Set a blob's R2 state (inside ``tx``), only from the states ``only_from`` (any if
        empty) and, with ``held``, only while the node holds the blob; True if the row changed.

        ``present`` records when R2 was last seen to hold it; ``none`` forgets that.
        """
        sets = {"present": ", r2_checked_at=?", "none": ", r2_checked_at=NULL"}.get(state, "")
        args: list[object] = [state, *([now] if state == "present" else []), cid, *only_from]
        where = f" AND r2_state IN ({','.join('?' * len(only_from))})" if only_from else ""
        where += " AND local_state='present'" if held else ""
        sql = f"UPDATE blobs SET r2_state=?{sets} WHERE cid=?{where}"  # noqa: S608
        cur = await tx.execute(sql, args)
        return cur.rowcount > 0

    async def not_in_r2(self) -> list[Cid]:
        """Blobs held locally whose R2 state is not ``present``, most wanted first."""
        sql = (
            "SELECT cid FROM blobs WHERE local_state='present' AND r2_state != 'present' "
            "ORDER BY access_score DESC"
        )
        async with self.conn.execute(sql) as cur:
            return [Cid(str(r[0])) for r in await cur.fetchall()]

    async def blobs_by_r2_state(self) -> dict[str, dict[str, int]]:
        """Blob count and bytes by R2 state."""
        sql = "SELECT r2_state, COUNT(*), SUM(size) FROM blobs GROUP BY r2_state"
        async with self.conn.execute(sql) as cur:
            return {
                str(r[0]): {"count": int(r[1]), "bytes": int(r[2] or 0)}
                for r in await cur.fetchall()
            }

    async def set_access(self, updates: Iterable[tuple[float, float, str]]) -> None:
        """Store folded access scores: ``(access_score, last_access, cid)`` each."""
        async with self.transaction() as tx:
            sql = "UPDATE blobs SET access_score=?, last_access=? WHERE cid=?"
            await tx.executemany(sql, updates)

    async def evictable(
        self, limit: int
    ) -> list[tuple[Cid, int, float, float | None, float | None]]:
        """Blobs R2 holds that nothing pins (the blob nor a media item using it), least wanted
        first: (cid, size, access_score, last_access, r2_checked_at). A blob never accessed
        counts as accessed when it was stored: one fetched ahead of a viewer must not be the
        first to go before the viewer asks for it (it would be fetched again)."""
        sql = (
            "SELECT b.cid, b.size, b.access_score, COALESCE(b.last_access, b.created_at), "
            "b.r2_checked_at FROM blobs b "
            "WHERE b.local_state='present' AND b.r2_state='present' AND b.pinned=0 "
            "AND NOT EXISTS (SELECT 1 FROM segments s JOIN media m ON m.media_id = s.media_id "
            "  WHERE s.cid = b.cid AND m.pinned = 1) "
            "AND NOT EXISTS (SELECT 1 FROM renditions r JOIN media m ON m.media_id = r.media_id "
            "  WHERE r.init_cid = b.cid AND m.pinned = 1) "
            "ORDER BY b.access_score LIMIT ?"
        )
        async with self.conn.execute(sql, (limit,)) as cur:
            return [
                (
                    Cid(str(c)),
                    int(n),
                    float(sc),
                    None if la is None else float(la),
                    None if ck is None else float(ck),
                )
                for c, n, sc, la, ck in await cur.fetchall()
            ]

    async def blob_groups(self) -> list[Row]:
        """Blob count, bytes and pinned count by (kind, local_state, r2_state)."""
        return await named_rows(
            self.conn,
            "SELECT kind, local_state, r2_state, COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes, "
            "SUM(pinned != 0) AS pinned FROM blobs GROUP BY kind, local_state, r2_state",
        )

    async def present_stats(self) -> tuple[int, int]:
        """(count, bytes) of blobs held locally."""
        sql = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs WHERE local_state='present'"
        async with self.conn.execute(sql) as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def iter_present(self, batch: int = 5000) -> AsyncIterator[list[tuple[Cid, int]]]:
        """Present blobs as (cid, size), in cid order, a batch at a time."""
        last = ""
        sql = (
            "SELECT cid, size FROM blobs WHERE local_state='present' AND cid > ? "
            "ORDER BY cid LIMIT ?"
        )
        while True:
            async with self.conn.execute(sql, (last, batch)) as cur:
                rows = [(Cid(str(r[0])), int(r[1])) for r in await cur.fetchall()]
            if not rows:
                return
            yield rows
            last = rows[-1][0]


async def migrate(conn: aiosqlite.Connection) -> list[int]:
    """Apply every packaged migration not yet applied, each atomically. Returns those applied."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    async with conn.execute("SELECT version FROM schema_migrations") as cur:
        done = {int(r[0]) for r in await cur.fetchall()}
    applied = []
    for m in load_migrations():
        if m.version in done:
            continue
        script = (
            "BEGIN IMMEDIATE;\n"
            + m.sql
            + "\n;INSERT INTO schema_migrations(version, name, applied_at) "
            + f"VALUES({m.version}, '{m.name}', {time.time()});\nCOMMIT;"
        )
        try:
            await conn.executescript(script)
        except BaseException:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise
        applied.append(m.version)
    return applied
