"""The testbed coordinator's routing (scripts/testbed/routing.py) on what heartbeats say.

Heartbeat admissions as nodes send them (checked against the OpenAPI document's ``Admission``):
a viewer of an item the bucket holds, with no node taking it at full rate, goes to a holder in
overflow only if that holder can spill (its redirect needs a HEAD, so a class B budget left);
otherwise to a node with room that can read the item, else straight to the bucket. A node whose
class B budget is spent cannot read an item it lacks from the bucket either (503).
"""

from __future__ import annotations

from typing import Any

from scripts.testbed.routing import NodeView, RoutingCoordinator
from tests.support.openapi import OpenApiDocument

ITEM = ("m" * 52, frozenset({"b1", "b2"}), 100_000.0)
DOC = OpenApiDocument()


def heartbeat(state: str, *, send: int, spill: bool | None, left: int | None) -> dict[str, Any]:
    """A node report's fields the coordinator reads, its admission valid as the API's."""
    adm: dict[str, Any] = {
        "state": state,
        "budget_bps": 1_000_000,
        "send_bps": send,
        "spare_bps": max(0, 1_000_000 - send),
        "streams": 3,
        "floor_spare_bps": 0,
        "redirects": 0,
        "refusals": 0,
    }
    if spill is not None:  # None: a node older than the field
        adm |= {"spill": spill, "r2_class_b_left": left}
    DOC.validate_component("Admission", adm)
    return {
        "peer_id": "p",
        "admission": adm,
        "load": {"egress_bps": send},
        "addresses": {"libp2p": []},
    }


def coordinator() -> tuple[RoutingCoordinator, list[NodeView]]:
    """Two holders of the item and one node without it, the bucket holding it."""
    c = RoutingCoordinator(
        signing_key=b"k" * 32,
        presign=lambda key: f"https://bucket.example/{key}",
        items=[ITEM],
        floors=[50_000.0],
    )
    views = []
    for i in range(3):
        v = NodeView(i, f"http://node{i}", 1_000_000.0, 0.01, None)
        v.seq = 0
        if i < 2:
            v.held = set(ITEM[1])
        c.add_node(v, f"node{i}")
        views.append(v)
    return c, views


async def test_overflow_goes_to_a_holder_only_if_it_can_spill() -> None:
    c, (a, b, other) = coordinator()
    # b has more spare uplink: without the field it would be picked
    c.heard(a, heartbeat("overflow", send=990_000, spill=True, left=500))
    c.heard(b, heartbeat("overflow", send=950_000, spill=False, left=0))
    c.heard(other, heartbeat("overflow", send=990_000, spill=True, left=500))
    route = await c.route(0)
    assert (route.kind, route.node) == ("node", a.index)

    # Neither holder can spill, the node with room has no class B budget to read the item:
    # straight to the bucket, not to a node that would answer 503.
    c.heard(a, heartbeat("overflow", send=990_000, spill=False, left=0))
    c.heard(other, heartbeat("open", send=0, spill=False, left=0))
    route = await c.route(0)
    assert (route.kind, route.node) == ("r2", None)
    assert set(route.urls) == {f"media/{ITEM[0]}.json", "blobs/b1", "blobs/b2"}

    # The node with room can read it from the bucket: it takes the viewer.
    c.heard(other, heartbeat("open", send=0, spill=True, left=40))
    route = await c.route(0)
    assert (route.kind, route.node) == ("node", other.index)


async def test_a_node_older_than_the_field_is_taken_to_spill() -> None:
    c, (a, b, other) = coordinator()
    c.heard(a, heartbeat("overflow", send=990_000, spill=None, left=None))
    c.heard(b, heartbeat("overflow", send=990_000, spill=False, left=0))
    c.heard(other, heartbeat("overflow", send=990_000, spill=None, left=None))
    assert a.spill
    assert a.class_b_left is None
    route = await c.route(0)
    assert (route.kind, route.node) == ("node", a.index)


def test_a_node_that_never_knew_does_not_take_an_item_out_of_the_bucket() -> None:
    """Inventories' ``r2_state``: a node that resolved the media from a peer reports its blobs
    ``none`` (it never knew); that does not undo another node's ``present``. A node that had
    said ``present`` and now says ``none`` (it demoted the item, or a 404 corrected it) does."""
    c, (a, b, other) = coordinator()
    for cid in ITEM[1]:
        c.learned(a, cid, "present")
        c.learned(other, cid, "none")
    assert c.in_r2(0)
    c.learned(a, "b1", "none")
    assert not c.in_r2(0)
    c.learned(b, "b1", "present")
    assert c.in_r2(0)
    # an item no node ever said was there is not
    c.learned(b, "x1", "none")
    assert c.r2_state["x1"] == "none"
