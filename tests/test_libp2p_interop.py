"""Interop: a stock py-libp2p host in its own process (libp2p's API and defaults, no peerd code)
dials a running peerd daemon: Noise + yamux, identify, ping, DHT provider lookup, the blob
protocol; a host offering only plaintext is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from peerd.core.ids import cid_of
from tests.support.p2p import p2p_addrs, seed_blobs
from tests.support.process import PeerdProcess, peerd_env

pytestmark = pytest.mark.timeout(120)

DATA = os.urandom(3 * 1024 * 1024 + 5)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerdProcess]:
    p = PeerdProcess(
        tmp_path_factory.mktemp("interop") / "node",
        config={
            "p2p": {
                "enabled": True,
                "host": "127.0.0.1",
                "tcp_port": 0,
                "ws_port": 0,
                "provide_tick_s": 0.2,
            }
        },
    )
    p.init()
    seed_blobs(p.state_dir, [DATA])
    p.start()
    try:
        yield p
    finally:
        assert p.stop() == 0


def stock(addr: str, cid: str, *extra: str) -> dict[str, object]:
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "tests.support.libp2p_stock", addr, cid, *extra],
        env=peerd_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    # The stock host's own traceback, if it failed, is what explains the failure.
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def test_stock_host_speaks_with_peerd(node: PeerdProcess) -> None:
    addr = next(a for a in p2p_addrs(node.state_dir) if "/ws" not in a)
    peer_id = addr.rsplit("/p2p/", 1)[1]
    cid = cid_of(DATA)
    r = stock(addr, cid)
    assert r["connected"] is True
    assert r["security"] == "SecureSession"  # Noise
    assert r["muxer"] == "Yamux"
    protocols = r["protocols"]
    assert isinstance(protocols, list)
    for proto in ("/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/ipfs/kad/1.0.0", "/peerd/blob/1.0.0"):
        assert proto in protocols
    assert isinstance(r["ping_us"], list)
    assert len(r["ping_us"]) == 2
    assert r["providers"] == [peer_id]
    assert r["blob_status"] == 0
    assert r["blob_size_ok"] is True
    assert r["blob_sha256"] == hashlib.sha256(DATA).hexdigest()


def test_plaintext_is_refused(node: PeerdProcess) -> None:
    addr = next(a for a in p2p_addrs(node.state_dir) if "/ws" not in a)
    r = stock(addr, cid_of(DATA), "plaintext")
    assert r["connected"] is False
