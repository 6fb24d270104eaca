"""A node whose media lives only in its R2 bucket, for read-through tests and benchmarks.

:func:`media_in_bucket_only` catalogs a packaged clip on a stopped node, uploads every blob to
the bucket under ``blobs/<cid>`` and drops the local copies (rows kept as ``absent`` with R2
``present``), which is the state tiering leaves a cold, evicted item in. A viewer's first request
for any segment then has to come through the resolver's R2 source.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from peerd.catalog import Catalog
from peerd.catalog.media import media_blobs
from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import Cid
from peerd.replication.r2 import blob_key
from peerd.runtime import open_runtime
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, MotoServer
from tests.support.whep_media import HlsClip, add_media


def r2_config(moto: MotoServer, bucket: str) -> dict[str, object]:
    """The ``[r2]`` section pointing a daemon at ``bucket`` on the moto server."""
    return {"endpoint": moto.url, "bucket": bucket, "tiering_interval_s": 3600.0}


def write_r2_secrets(state_dir: Path) -> None:
    """The credential secrets a daemon needs for the moto server."""
    secrets = state_dir / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    for name, value in (("r2_access_key_id", ACCESS_KEY), ("r2_secret_access_key", SECRET_KEY)):
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)


async def media_in_bucket_only(
    state_dir: Path, clip: HlsClip, moto: MotoServer, bucket: str
) -> tuple[Cid, list[Cid]]:
    """Catalog ``clip`` on the stopped node at ``state_dir`` with its blobs only in ``bucket``;
    returns the media id and the blob ids."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state_dir}))
    try:
        media_id = await add_media(rt, clip)
        cids = await media_blobs(rt.catalog, media_id)
        async with rt.catalog.transaction() as tx:
            for cid in cids:
                await Catalog.set_blob_r2(tx, cid, "present", time.time())
        for cid in cids:
            data = await rt.store.read(cid)
            await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
            await rt.store.evict_local(cid)
        await rt.catalog.set_state("clean_shutdown", "1")
        return media_id, cids
    finally:
        await rt.close()


def hls_url(base_url: str, state_dir: Path, media_id: str, path: str = "master.m3u8") -> str:
    """A signed URL under the media, with the node's own ``hls_signing_key``."""
    secret = (state_dir / "secrets" / "hls_signing_key").read_text()
    token = tokens.mint(tokens.key_from_secret(secret), media_id, "hls", int(time.time()) + 600)
    return f"{base_url}/hls/{media_id}/{path}?token={token}"
