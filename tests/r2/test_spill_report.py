"""A node tells the coordinator whether streams over its uplink budget can go to the bucket.

Real daemons with moto as R2, the fake coordinator receiving their signed heartbeats, the node
API read with its bearer token (answers checked against the OpenAPI document). A node whose
month's class B budget is spent cannot HEAD before a redirect, so it gives none: its heartbeat
and ``/api/v1/health`` say ``spill`` false and no class B request left, and a coordinator must
not send it viewers it would have to refuse. A node with budget left says ``spill`` true and
how much is left; one without R2 says false and null.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.support.coordinator import FakeCoordinator, NodeApiClient
from tests.support.faultproxy import FaultProxy
from tests.support.process import PeerdProcess
from tests.support.r2media import write_r2_secrets

pytestmark = pytest.mark.timeout(120)


def node_with(root: Path, coordinator: str, r2: dict[str, Any] | None) -> PeerdProcess:
    """A node heartbeating to ``coordinator`` with an uplink budget, and R2 if ``r2``."""
    config: dict[str, dict[str, Any]] = {
        "mdns": {"enabled": False},
        "p2p": {"enabled": False},
        "uplink": {"budget_mbps": 8},
        "coordinator": {"url": coordinator, "heartbeat_interval_s": 1.0},
    }
    if r2 is not None:
        config["r2"] = r2
    return PeerdProcess(root, config=config)


async def test_heartbeat_and_health_say_whether_overflow_can_go_to_the_bucket(
    tmp_path: Path, bucket: str, proxy: FaultProxy
) -> None:
    fake = FakeCoordinator()
    await fake.start()
    r2 = {"endpoint": proxy.url, "bucket": bucket}
    nodes = {
        "spent": node_with(tmp_path / "spent", fake.url, r2 | {"budget_class_b_per_month": 0}),
        "left": node_with(tmp_path / "left", fake.url, r2 | {"budget_class_b_per_month": 1000}),
        "none": node_with(tmp_path / "none", fake.url, None),
    }
    clients: list[NodeApiClient] = []
    try:
        for name, node in nodes.items():
            await asyncio.to_thread(node.init)
            if name != "none":
                write_r2_secrets(node.state_dir)
            await asyncio.to_thread(node.start)
        health, peer_ids = {}, {}
        for name, node in nodes.items():
            token = (node.state_dir / "secrets" / "api_token").read_text().strip()
            api = NodeApiClient(node.base_url, token)
            clients.append(api)
            answer = await api.call("GET", "/api/v1/health")
            assert answer.status == 200
            health[name] = answer.body["admission"]
            peer_ids[(await api.call("GET", "/api/v1/node")).body["peer_id"]] = name
        assert (health["spent"]["spill"], health["spent"]["r2_class_b_left"]) == (False, 0)
        assert health["left"]["spill"] is True
        assert 0 < health["left"]["r2_class_b_left"] <= 1000
        assert (health["none"]["spill"], health["none"]["r2_class_b_left"]) == (False, None)

        def beats() -> dict[str, dict[str, Any]]:
            last = {}
            for r in fake.of_kind("heartbeat"):
                last[peer_ids.get(r.payload["peer_id"], "")] = r.payload["admission"]
            return last

        await fake.wait_for(lambda: set(nodes) <= set(beats()))
        beat = beats()
        assert (beat["spent"]["spill"], beat["spent"]["r2_class_b_left"]) == (False, 0)
        assert beat["left"]["spill"] is True
        assert 0 < beat["left"]["r2_class_b_left"] <= 1000
        assert (beat["none"]["spill"], beat["none"]["r2_class_b_left"]) == (False, None)
    finally:
        for api in clients:
            await api.close()
        for node in nodes.values():
            await asyncio.to_thread(node.stop)
        await fake.close()
