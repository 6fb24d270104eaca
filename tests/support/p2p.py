"""Helpers for peer-to-peer tests and benchmarks: seed a node's store, sign node requests,
read a node's metrics and libp2p addresses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from peerd.config import load_settings
from peerd.core.ids import Cid
from peerd.core.signing import sign_headers
from peerd.identity import Identity
from peerd.runtime import open_runtime


async def _seed(state_dir: Path, blobs: list[bytes], corrupt: bool) -> list[Cid]:
    settings = load_settings(None, node={"state_dir": state_dir})
    rt = await open_runtime(settings)
    try:
        cids = [await rt.store.put(b) for b in blobs]
        if corrupt:
            for cid in cids:
                path = rt.store.path_for(cid)
                size = path.stat().st_size
                # Same length, different bytes: only a hash check can tell.
                path.chmod(0o644)
                path.write_bytes(bytes(size))
        await rt.catalog.set_state("clean_shutdown", "1")
        return cids
    finally:
        await rt.close()


def seed_blobs(state_dir: Path, blobs: list[bytes], *, corrupt: bool = False) -> list[Cid]:
    """Put blobs into a stopped node's store (``corrupt``: then overwrite their files with
    zeros of the same length, making the node a peer that sends wrong bytes)."""
    return asyncio.run(_seed(state_dir, blobs, corrupt))


def signed_request(
    ident: Identity, base_url: str, method: str, path: str, timeout: float = 60
) -> tuple[int, bytes]:
    """A node-signed HTTP request; returns (status, body)."""
    headers = sign_headers(method, path, time.time(), ident.peer_id, ident.public_bytes, ident.sign)
    req = urllib.request.Request(base_url + path, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def fetch_via(ident: Identity, base_url: str, cid: str) -> dict[str, object]:
    """Ask a node to get a blob through its resolver (``POST /p2p/v1/fetch/<cid>``)."""
    status, body = signed_request(ident, base_url, "POST", f"/p2p/v1/fetch/{cid}")
    out = json.loads(body)
    out["status"] = status
    assert isinstance(out, dict)
    return out


def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample from a node's ``/metrics`` (0 if absent)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        mname, _, lab = key.partition("{")
        got = ",".join(sorted(lab.rstrip("}").split(","))) if lab else ""
        if mname == name and got == want:
            return float(value)
    return 0.0


def p2p_addrs(state_dir: Path, timeout: float = 30) -> list[str]:
    """The libp2p multiaddrs a running node wrote to ``<state>/p2p.addrs``."""
    path = state_dir / "p2p.addrs"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().split()
        time.sleep(0.05)
    raise TimeoutError(f"{path} not written")


@contextlib.contextmanager
def loopback_multicast() -> Iterator[None]:
    """mDNS between processes on one host needs the MULTICAST flag on ``lo``: set it for the
    duration (if it was off) and restore it after. Needs CAP_NET_ADMIN (tests run as root)."""
    flags = subprocess.run(
        ["ip", "-o", "link", "show", "lo"],  # noqa: S607
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    turned_on = "MULTICAST" not in flags
    if turned_on:
        subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=True)  # noqa: S607
    try:
        yield
    finally:
        if turned_on:
            subprocess.run(["ip", "link", "set", "lo", "multicast", "off"], check=True)  # noqa: S607
