"""``peerd ingest PATH...``: package files or folders into this node's store and catalog.

With the node's daemon running, the daemon does the work (over its control socket, see
:mod:`peerd.ctl`); ``--local``, ``--watch`` or no daemon: this process does.

Prints one line per file (or a JSON object with ``--json``) and exits 1 if any file failed;
the rest of the batch still runs. A tqdm bar on stderr shows progress in media seconds and the
speed in x real time. ``--watch`` keeps watching the folders and ingests new or changed files
once they stop growing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd import ctl
from peerd.config import Settings

if TYPE_CHECKING:
    # The packager (PyAV), the catalog and the store are imported when `ingest` runs, not when
    # the CLI builds its parser for some other command.
    from peerd.media.ingest import IngestResult, ProgressFn


def register(sub: Any) -> None:
    """Add the ``ingest`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("ingest", help="package media files or folders into HLS blobs")
    ctl.add_ingest_arguments(p)
    p.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``peerd ingest``: in the running daemon if there is one, else in this process."""
    via_daemon = ctl.ingest_via_daemon(settings.state_dir, args)
    if via_daemon is not None:
        return via_daemon
    try:
        return asyncio.run(_ingest(args, settings))
    except KeyboardInterrupt:
        return 130


def _print(res: IngestResult, as_json: bool) -> None:
    ctl.print_result(res.as_json(), as_json)


def _bar_factory(enabled: bool) -> Callable[[Path], ProgressFn | None]:
    make = ctl.bar_factory(enabled)
    return lambda path: make(path.name)


async def _open_store(settings: Settings) -> Any:
    """The node's catalog and blob store: all that ingesting needs.

    Not `open_runtime`: the node key (cryptography) and the metrics registry (prometheus) are
    of no use to a one-shot CLI run and cost ~50 ms of imports at every start.
    """
    from peerd.catalog import Catalog
    from peerd.store import BlobStore

    await asyncio.to_thread(settings.state_dir.mkdir, parents=True, exist_ok=True, mode=0o750)
    catalog = await Catalog.open(settings.catalog_path)
    store = BlobStore(
        settings.blob_dir,
        catalog,
        quota_bytes=settings.store.quota_bytes,
        min_free_bytes=settings.store.min_free_bytes,
    )
    try:
        await store.open()
    except BaseException:
        await catalog.close()
        raise
    return store


async def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from peerd.media.ingest import Ingestor

    if args.from_bucket:
        return await _ingest_uploads(args, settings)
    store = await _open_store(settings)
    try:
        # The node's options, and this command's overrides for its files (the catalog tells
        # rows packaged with the node's options before options were recorded from the others).
        options = settings.media.overridden(ctl.media_overrides(args)).packaging_options()
        node = settings.media.packaging_options()
        ing = Ingestor(store.catalog, store, options if args.watch else node)
        bars = _bar_factory(not args.no_progress and not args.json and sys.stderr.isatty())
        if args.watch:
            dirs = [p for p in args.paths if p.is_dir()]
            if not dirs:
                print("peerd: --watch needs at least one folder", file=sys.stderr)
                return 2
            await ing.watch(
                dirs,
                settle_s=settings.media.watch_settle_s,
                interval_s=settings.media.watch_interval_s,
                on_result=lambda r: _print(r, args.json),
            )
            return 0
        results = await ing.ingest_many(
            args.paths,
            force=args.force,
            progress_for=bars,
            on_result=lambda r: _print(r, args.json),
            options=options,
        )
        if not results:
            print("peerd: no media files found", file=sys.stderr)
            return 1
        return 0 if all(r.ok for r in results) else 1
    finally:
        await store.catalog.close()


async def _ingest_uploads(args: argparse.Namespace, settings: Settings) -> int:
    """``peerd ingest --from-bucket KEY...`` with no daemon: this process downloads, packages
    and publishes each upload (working the replication outbox itself)."""
    from peerd.media.ingest import node_ingestor
    from peerd.replication.cli import open_replication
    from peerd.replication.uploads import Uploads

    if args.watch:
        print(
            "peerd: --watch watches folders; set [r2] watch_uploads for the bucket", file=sys.stderr
        )
        return 2
    options = settings.media.overridden(ctl.media_overrides(args)).packaging_options()
    async with open_replication(settings) as (rt, rep):
        uploads = Uploads(rt, rep.client, rep, node_ingestor(rt), run_outbox=True)
        failed = 0
        for key in args.paths:
            res = await uploads.ingest_key(key.as_posix(), options=options)
            failed += 0 if res.ok else 1
            ctl.print_result(res.as_json(), args.json)
    return 0 if not failed else 1
