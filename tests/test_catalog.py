"""Catalog: migrations, transactions, blob rows; SQL lives in the catalog package."""

import re
from pathlib import Path

import pytest

from peerd.catalog import Catalog
from peerd.catalog.db import load_migrations
from peerd.core.ids import cid_of


async def test_migrations_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    cat = await Catalog.open(path)
    async with cat.conn.execute("SELECT version FROM schema_migrations ORDER BY version") as cur:
        versions = [r[0] for r in await cur.fetchall()]
    assert versions == [m.version for m in load_migrations()]
    await cat.close()
    cat = await Catalog.open(path)  # re-open: nothing re-applied, no error
    async with cat.conn.execute("PRAGMA journal_mode") as cur:
        row = await cur.fetchone()
    assert row is not None
    assert row[0] == "wal"
    await cat.close()


async def test_transaction_rolls_back(tmp_path: Path) -> None:
    cat = await Catalog.open(tmp_path / "c.sqlite3")
    cid = cid_of(b"x")

    async def write_then_fail() -> None:
        async with cat.transaction() as tx:
            await Catalog.put_blob_row(tx, cid, 1, "segment", 0.0)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await write_then_fail()
    assert await cat.get_blob(cid) is None
    await cat.add_blob(cid, 1, "segment", 5.0)
    row = await cat.get_blob(cid)
    assert row is not None
    assert row.local_state == "present"
    assert row.created_at == 5.0
    assert await cat.present_stats() == (1, 1)
    await cat.mark_absent([cid])
    assert await cat.present_stats() == (0, 0)
    assert await cat.delete_blob_row(cid)
    await cat.close()


async def test_node_state(tmp_path: Path) -> None:
    cat = await Catalog.open(tmp_path / "c.sqlite3")
    assert await cat.get_state("k") is None
    await cat.set_state("k", "1")
    await cat.set_state("k", "2")
    assert await cat.get_state("k") == "2"
    await cat.close()


async def test_iter_present_pages(tmp_path: Path) -> None:
    cat = await Catalog.open(tmp_path / "c.sqlite3")
    cids = sorted(cid_of(str(i).encode()) for i in range(25))
    for c in cids:
        await cat.add_blob(c, 3, "segment")
    seen = [c async for batch in cat.iter_present(batch=7) for c, _ in batch]
    assert seen == cids
    await cat.close()


PACKAGE = Path(__file__).resolve().parents[1] / "peerd"
# whole words: an HLS playlist's AUTOSELECT is not SQL
SQL = re.compile(r"\bSELECT\b|\bINSERT INTO\b|\bUPDATE\b .* \bSET\b|\bDELETE FROM\b")


def test_sql_lives_next_to_the_schema() -> None:
    with_sql = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.parts[len(PACKAGE.parts)] != "catalog" and SQL.search(path.read_text("utf-8"))
    }
    assert with_sql == set()
