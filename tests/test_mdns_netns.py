"""mDNS between network namespaces: two daemons, each in its own namespace, joined by veth pairs
on a test bridge. The empty node finds the holder by mDNS on that link, fetches a blob over
signed LAN HTTP, verifies it and serves it."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from peerd.core.ids import cid_of
from peerd.identity import Identity
from tests.support.p2p import fetch_via, metric, seed_blobs, signed_request
from tests.support.process import PeerdProcess

pytestmark = pytest.mark.timeout(120)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def link() -> Iterator[dict[str, str]]:
    """Namespaces ``a`` and ``b`` with 10.206.N.1 and .2, bridged; the test host is .254."""
    tag = secrets.token_hex(3)
    net = f"10.206.{int(tag[:2], 16)}"
    bridge = f"pbr{tag}"
    names = {"a": f"peerd6a-{tag}", "b": f"peerd6b-{tag}"}
    made: list[str] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        made.append(bridge)
        ip("addr", "add", f"{net}.254/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, (key, ns) in enumerate(names.items(), start=1):
            ip("netns", "add", ns)
            made.append(ns)
            outer, inner = f"pv{key}{tag}", f"pi{key}{tag}"
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", bridge)
            ip("link", "set", outer, "up")
            ip("-n", ns, "addr", "add", f"{net}.{i}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield {"a_ns": names["a"], "b_ns": names["b"], "a": f"{net}.1", "b": f"{net}.2"}
    finally:
        for name in reversed(made):
            if name == bridge:
                subprocess.run(["ip", "link", "del", bridge], check=False)
            else:
                subprocess.run(["ip", "netns", "del", name], check=False)


def test_mdns_across_namespaces(
    tmp_path_factory: pytest.TempPathFactory, link: dict[str, str]
) -> None:
    base = tmp_path_factory.mktemp("netns")
    client = Identity.generate()
    data = os.urandom(1_500_000)
    cid = cid_of(data)
    nodes = {}
    for key in ("a", "b"):
        nodes[key] = PeerdProcess(
            base / key,
            config={
                "http": {"host": link[key], "port": 0},
                "mdns": {
                    "enabled": True,
                    "interfaces": [link[key]],
                    "recheck_s": 2.0,
                    "trusted_peers": [client.peer_id],
                },
            },
            host=link[key],
            prefix=["ip", "netns", "exec", link[f"{key}_ns"]],
        )
        nodes[key].init()
    seed_blobs(nodes["b"].state_dir, [data])
    try:
        for n in nodes.values():
            n.start(wait=False)
        for n in nodes.values():
            n.wait_ready()
        a = nodes["a"]
        deadline = time.monotonic() + 20
        while not any(
            '"msg":"peer seen"' in line and link["b"] in line for line in a.logs().splitlines()
        ):
            assert time.monotonic() < deadline, a.logs()[-3000:]
            time.sleep(0.2)
        got = fetch_via(client, a.base_url, cid)
        assert got["status"] == 200, got
        assert metric(a.base_url, "peerd_fetches_total", source="lan", outcome="ok") == 1
        assert signed_request(client, a.base_url, "GET", f"/p2p/v1/blobs/{cid}") == (200, data)
    finally:
        codes = [n.stop() for n in nodes.values()]
    assert codes == [0, 0]
