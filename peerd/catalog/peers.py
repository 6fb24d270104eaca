"""Queries on ``peers``: the peers a node has seen, so that bans survive a restart.

The in-memory :class:`~peerd.core.peers.PeerTable` is authoritative; these rows are its record.
"""

from __future__ import annotations

import json

from peerd.catalog.db import Catalog, Row, named_rows
from peerd.core.peers import Peer


async def banned_peers(catalog: Catalog, via: str, now: float) -> list[Peer]:
    """Peers found ``via`` whose ban lasts beyond ``now``."""
    async with catalog.conn.execute(
        "SELECT peer_id, http_url, addrs, version, first_seen, last_seen, rtt_ms, failures,"
        " banned_until FROM peers WHERE via = ? AND banned_until > ?",
        (via, now),
    ) as cur:
        rows = list(await cur.fetchall())
    return [
        Peer(
            peer_id=str(r[0]),
            url=r[1],
            addrs=tuple(json.loads(r[2] or "[]")),
            version=r[3],
            via=via,
            first_seen=float(r[4]),
            last_seen=float(r[5]),
            expires_at=0.0,
            rtt_ms=r[6],
            failures=int(r[7]),
            banned_until=r[8],
        )
        for r in rows
    ]


async def save_peer(catalog: Catalog, p: Peer, via: str) -> None:
    """Insert or update the row of ``p`` (a known URL or version is kept if ``p`` has none)."""
    async with catalog.transaction() as conn:
        await conn.execute(
            "INSERT INTO peers (peer_id, via, http_url, addrs, version, first_seen,"
            " last_seen, rtt_ms, failures, banned_until) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(peer_id) DO UPDATE SET via=excluded.via,"
            " http_url=COALESCE(excluded.http_url, peers.http_url),"
            " addrs=excluded.addrs, version=COALESCE(excluded.version, peers.version),"
            " last_seen=excluded.last_seen, rtt_ms=excluded.rtt_ms,"
            " failures=excluded.failures, banned_until=excluded.banned_until",
            (
                p.peer_id,
                via,
                p.url,
                json.dumps(list(p.addrs)),
                p.version,
                p.first_seen,
                p.last_seen,
                p.rtt_ms,
                p.failures,
                p.banned_until,
            ),
        )


async def recent_peers(catalog: Catalog, limit: int = 500) -> list[Row]:
    """The peers seen last: peer_id, via, http_url, version, last_seen, rtt_ms, failures."""
    return await named_rows(
        catalog.conn,
        "SELECT peer_id, via, http_url, version, last_seen, rtt_ms, failures FROM peers "
        "ORDER BY last_seen DESC LIMIT ?",
        (limit,),
    )
