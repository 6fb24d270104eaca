"""The reference coordinator of the testbed: the node contract's fake plus routing.

Built on ``tests.support.coordinator.FakeCoordinator`` (signed register/heartbeat/drain, schema
checked). On every accepted heartbeat whose inventory ``seq`` moved, it pages through the node's
``GET /api/v1/inventory`` (bearer ``api_token``, answers validated against the OpenAPI document)
and keeps the set of blobs each node holds. A node is alive while its heartbeats keep coming
(``3 x`` the interval) and until a viewer reports it failed.

:meth:`RoutingCoordinator.route` sends a viewer, by policy:

* ``peerd`` (and ``lru``): a live node that takes a new stream -- spare uplink (its budget, or
  configured uplink, times ``admit_fraction``, minus the larger of its reported send rate and
  the streams the coordinator sent it), not in ``overflow`` at its last heartbeat (the node's
  own admission state), no 503 whose ``Retry-After`` still runs; for an item the bucket holds
  it must keep ``r2_reserve`` of its uplink free besides (for viewers of items only nodes can
  serve). In order: a node holding every blob of the item; else the LAN partner of a holder
  (it fetches over the LAN); else any node that can get it (from the bucket, or, both speaking
  libp2p, from a holder; ``any_node`` only, or for items in the bucket, and then not a node
  whose heartbeat says its class B budget is spent). When none takes it and
  the bucket holds the item: a holder in ``overflow`` whose heartbeat says ``spill`` (it
  redirects the segments to the bucket, counting the demand for its tiering; one that cannot,
  its class B budget spent, would only refuse), else the bucket directly (overflow). When the bucket
  lacks it (or a viewer just found it down): a holder, else a holder's LAN partner, with room
  for the item at its lowest rendition (the heartbeat's ``floor_spare_bps``, less the floors of
  viewers sent there since; the node admits such a stream at its floor), else the node whose
  ``Retry-After`` ends first (the viewer waits for it);
* ``no_r2``: the same, never the bucket;
* ``all_r2``: always the bucket.

What a viewer met comes back with its next request (:data:`scripts.testbed.player.Avoid`): a node
that did not answer or sent wrong bytes counts as down until its next heartbeat; one that
answered 503 is not sent new viewers until its ``Retry-After`` ends; one that could not get an
item it lacks (its LAN partner cut off) is not sent that item's viewers for ``r2_retry_s``.

The bucket is used only for items it holds: the coordinator follows each blob's ``r2_state`` in
the inventories (tiering removes cold media from the bucket; a node's ``none`` counts against
another's ``present`` only once it had said ``present`` itself, see :meth:`learned`) and what
viewers report (an item a viewer could not get from the bucket is not sent there for
``r2_retry_s``).

A node route is a signed master playlist URL (``peerd.core.tokens``, the shared
``hls_signing_key``), as the Worker would mint it; a bucket route is a presigned GET URL per
object of the item (the bucket is private, as R2's are).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from peerd.core import tokens
from scripts.testbed.player import R2_FAILED, Avoid, Route
from tests.support.coordinator import FakeCoordinator, NodeApiClient


@dataclass
class NodeView:
    """What the coordinator knows of one node."""

    index: int
    base_url: str
    uplink_Bps: float
    rtt_s: float
    lan_peer: int | None
    peer_id: str = ""
    last_seen: float = 0.0
    egress_Bps: float = 0.0
    assigned_Bps: float = 0.0
    held: set[str] = field(default_factory=set)
    since: int = 0
    seq: int = -1
    failed_at: float = 0.0
    api: NodeApiClient | None = None
    syncing: asyncio.Task[None] | None = None
    streams: int = 0
    admission: str = "off"  # the heartbeat's admission state: off, open, overflow
    refusing_until: float = 0.0  # a viewer got 503 + Retry-After from it
    floor_spare_Bps: float = 0.0  # room at lowest renditions (heartbeat), less floors sent since
    libp2p: bool = False  # it reports libp2p addresses (it can fetch from, and serve, others)
    spill: bool = True  # the heartbeat's admission.spill: in overflow it redirects to the bucket
    class_b_left: int | None = None  # the heartbeat's admission.r2_class_b_left (None: no R2)
    r2_said: dict[str, str] = field(default_factory=dict)  # blob -> its inventory's r2_state


@dataclass
class RoutingCoordinator(FakeCoordinator):
    """See the module doc."""

    views: dict[str, NodeView] = field(default_factory=dict)
    by_index: dict[int, NodeView] = field(default_factory=dict)
    api_token: str = ""
    signing_key: bytes = b""
    presign: Callable[[str], str] | None = None
    policy: str = "peerd"
    items: list[tuple[str, frozenset[str], float]] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)  # item -> its lowest rendition (bytes/s)
    admit_fraction: float = 0.85
    interval_s: float = 2.0
    routes: list[tuple[float, int, str, int | None]] = field(default_factory=list)
    r2_state: dict[str, str] = field(default_factory=dict)
    r2_missing: dict[int, float] = field(default_factory=dict)  # item -> when a viewer failed
    # (node, item) -> when a viewer found the node could not get the item it lacks (its LAN
    # partner cut off, the bucket without it)
    node_missing: dict[tuple[int, int], float] = field(default_factory=dict)
    r2_retry_s: float = 20.0
    any_node: bool = False
    r2_reserve: float = 0.15
    minted: int = 0

    def add_node(self, view: NodeView, name: str) -> None:
        """Tell the coordinator a node's name, its base URL and uplink (from its config)."""
        self.views[name] = view
        self.by_index[view.index] = view

    async def _report(self, request: web.Request) -> web.Response:
        resp = await super()._report(request)
        if resp.status == 200 and self.reports:
            payload: dict[str, Any] = self.reports[-1].payload
            view = self.views.get(payload["name"])
            if view is not None:
                self.heard(view, payload)
                seq = int(payload["inventory"]["seq"])
                if seq != view.seq and (view.syncing is None or view.syncing.done()):
                    view.syncing = asyncio.create_task(self._sync(view, seq))
        # The node does not need every heartbeat's reports kept (memory over a long run).
        del self.reports[:-1]
        del self.raw[:]
        return resp

    def heard(self, view: NodeView, payload: dict[str, Any]) -> None:
        """What a node's accepted heartbeat tells about it."""
        view.peer_id = payload["peer_id"]
        view.last_seen = time.monotonic()
        adm = payload["admission"]
        view.admission = adm["state"]
        view.floor_spare_Bps = float(adm.get("floor_spare_bps", 0))
        # A node older than the field redirected whenever its catalog said the bucket held
        # the blob: as before.
        view.spill = bool(adm.get("spill", True))
        view.class_b_left = adm.get("r2_class_b_left")
        # With a budget the node's own meter (and its budget) is what admits viewers.
        if adm["state"] == "off":
            view.egress_Bps = float(payload["load"]["egress_bps"])
        else:
            view.egress_Bps = float(adm["send_bps"])
            view.uplink_Bps = float(adm["budget_bps"])
        view.libp2p = bool(payload["addresses"]["libp2p"])

    def learned(self, view: NodeView, cid: str, state: str) -> None:
        """A node's inventory gives a blob's ``r2_state``. ``present`` is news; anything else
        overrides another node's ``present`` only when this node had said ``present`` itself
        (it removed the blob from the bucket, or a 404 corrected its catalog): a node that
        resolved the media from a peer records the blob as ``none`` without knowing, and
        latest-report-wins took that for the item leaving the bucket (no bucket route, viewers
        piled on holders that could not redirect)."""
        before = view.r2_said.get(cid)
        view.r2_said[cid] = state
        if state == "present" or before == "present" or cid not in self.r2_state:
            self.r2_state[cid] = state

    async def _sync(self, view: NodeView, seq: int) -> None:
        if view.api is None:
            view.api = NodeApiClient(view.base_url, self.api_token)
        with contextlib.suppress(Exception):
            while True:
                ans = await view.api.call(
                    "GET", "/api/v1/inventory", params={"since": view.since, "limit": 1000}
                )
                for it in ans.body["items"]:
                    if it["kind"] != "blob":
                        continue
                    if it.get("r2_state") is not None:
                        self.learned(view, it["id"], it["r2_state"])
                    if it["state"] == "present":
                        view.held.add(it["id"])
                    else:
                        view.held.discard(it["id"])
                view.since = ans.body["next_since"]
                if not ans.body["more"]:
                    break
            view.seq = seq

    async def close(self) -> None:
        """Stop listening and close the node API clients."""
        for v in self.views.values():
            if v.syncing is not None:
                v.syncing.cancel()
            if v.api is not None:
                await v.api.close()
        await super().close()

    def synced(self) -> bool:
        """True once every node reported and its inventory was read."""
        return all(v.seq >= 0 for v in self.views.values())

    def alive(self, v: NodeView) -> bool:
        """Heartbeats recent, and no viewer reported it failed since its last heartbeat."""
        now = time.monotonic()
        return now - v.last_seen < 3 * self.interval_s + 1 and v.failed_at < v.last_seen - 1e-9

    def holds(self, v: NodeView, item: int) -> bool:
        """The node has every blob of the item."""
        return self.items[item][1] <= v.held

    def in_r2(self, item: int) -> bool:
        """The bucket holds every blob of the item, as far as the nodes' inventories say (and no
        viewer found otherwise)."""
        if self.policy == "no_r2":
            return False
        if time.monotonic() - self.r2_missing.get(item, -1e9) < self.r2_retry_s:
            return False  # a viewer just failed there (an outage, or tiering removed it)
        return all(self.r2_state.get(c, "present") == "present" for c in self.items[item][1])

    def spare(self, v: NodeView) -> float:
        """Uplink the coordinator may still give away on ``v`` (bytes/s)."""
        return v.uplink_Bps * self.admit_fraction - max(v.egress_Bps, v.assigned_Bps)

    def takes(self, v: NodeView, need: float, now: float, in_r2: bool = False) -> bool:
        """Whether ``v`` takes a new stream of ``need`` bytes/s: room in the coordinator's
        count, not in overflow at its last heartbeat, no 503 whose Retry-After still runs. A
        stream the bucket can serve leaves ``r2_reserve`` of the uplink to streams it cannot
        (a viewer of those refused by a full holder waits out a ``Retry-After``; one of these
        sent to the bucket waits for nothing)."""
        reserve = self.r2_reserve * v.uplink_Bps if in_r2 else 0.0
        return (
            self.spare(v) >= need + reserve
            and v.admission != "overflow"
            and v.refusing_until <= now
        )

    def reaches(self, v: NodeView, item: int, holders: list[NodeView], r2_ok: bool) -> bool:
        """Whether ``v`` can get the item it lacks: from the bucket (its class B budget not
        spent: past it the read is 503), its LAN partner, or (both speaking libp2p) a live
        holder."""
        if (r2_ok and v.class_b_left != 0) or (
            v.lan_peer is not None and self.by_index[v.lan_peer] in holders
        ):
            return True
        return v.libp2p and any(h.libp2p for h in holders)

    def _node_route(self, v: NodeView, item: int, need: float) -> Route:
        media_id = self.items[item][0]
        # One token per viewer: a node tells streams apart by media, client address and token,
        # and every modelled viewer comes from the same address (real ones do not).
        self.minted += 1
        expires = int(time.time()) + 3600 + self.minted % 1800
        token = tokens.mint(self.signing_key, media_id, "hls", expires)
        v.assigned_Bps += need
        v.streams += 1
        return Route(
            "node", f"{v.base_url}/hls/{media_id}/master.m3u8?token={token}", v.index, v.rtt_s
        )

    def _r2_route(self, media_id: str, cids: frozenset[str]) -> Route:
        """The bucket: presigned GET URLs of the manifest and of every blob of the item."""
        assert self.presign is not None
        keys = [f"media/{media_id}.json", *(f"blobs/{c}" for c in cids)]
        return Route("r2", self.presign(keys[0]), urls={k: self.presign(k) for k in keys})

    async def route(
        self, item: int, avoid: Avoid | None = None, *, force_node: bool = False
    ) -> Route:
        """Pick a source for a viewer of ``item`` (see the module doc); ``avoid``: what the
        viewer met lately (a node down, refusing or lacking the item; the bucket lacking it);
        ``force_node``: a node even past its budget (the sanity players check what nodes
        serve)."""
        now = time.monotonic()
        avoid = avoid or {}
        shunned = set()
        for i, (until, why) in avoid.items():
            if until <= now:
                continue
            if i == R2_FAILED:
                self.r2_missing[item] = max(self.r2_missing.get(item, 0.0), now)
                continue
            shunned.add(i)
            v = self.by_index[i]
            if why == "down":
                v.failed_at = max(v.failed_at, v.last_seen)
            elif why == "refused":
                v.refusing_until = max(v.refusing_until, until)
            elif why == "missing":
                self.node_missing[(i, item)] = now
        media_id, cids, need = self.items[item]
        if self.policy == "all_r2" and not force_node:
            self.routes.append((now, item, "r2", None))
            return self._r2_route(media_id, cids)
        r2_ok = self.in_r2(item)
        alive = [v for v in self.by_index.values() if self.alive(v)]
        holders = [v for v in alive if self.holds(v, item)]
        live = [
            v
            for v in alive
            if v.index not in shunned
            and (
                v in holders or now - self.node_missing.get((v.index, item), -1e9) > self.r2_retry_s
            )
        ]
        # Holders, their LAN partners, then any node that can get the item (R2, libp2p).
        tiers = [
            [v for v in live if v in holders],
            [v for v in live if v.lan_peer is not None and self.by_index[v.lan_peer] in holders],
        ]
        if self.any_node or r2_ok:
            tiers.append([v for v in live if self.reaches(v, item, holders, r2_ok)])
        for tier in tiers:
            fit = [v for v in tier if self.takes(v, need, now, r2_ok)]
            if fit:
                return self._pick(max(fit, key=self.spare), item, need, now)
        if r2_ok and not force_node:
            # No room. A holder in overflow that can spill redirects the segments to the
            # bucket: it sees the demand (its tiering keeps the item in R2), and serves the
            # viewer itself if it has room by then. One that cannot (its class B budget spent:
            # no HEAD, no redirect) would only refuse. Otherwise: the bucket.
            redirecting = [
                v
                for v in tiers[0]
                if v.admission == "overflow" and v.spill and v.refusing_until <= now
            ]
            if redirecting:
                return self._pick(max(redirecting, key=self.spare), item, need, now)
            self.routes.append((now, item, "r2", None))
            return self._r2_route(media_id, cids)
        # No room anywhere and the bucket cannot take it: a node that takes it at its lowest
        # rendition, else the node that refuses for the least time (its Retry-After), then the
        # least loaded; the viewer waits for it.
        floor = self.floors[item] if item < len(self.floors) else need
        for tier in tiers[:2]:  # not one that must pull the item through another uplink
            fit = [v for v in tier if v.refusing_until <= now and v.floor_spare_Bps >= floor]
            if fit:
                best = max(fit, key=lambda v: v.floor_spare_Bps)
                best.floor_spare_Bps -= floor
                return self._pick(best, item, need, now)
        for tier in tiers:
            if tier:
                best = min(tier, key=lambda v: (v.refusing_until, -self.spare(v)))
                return self._pick(best, item, need, now)
        fallback = [v for v in holders if v.index not in shunned] or holders
        if fallback and not r2_ok:
            best = min(fallback, key=lambda v: (v.refusing_until, -self.spare(v)))
            return self._pick(best, item, need, now)
        self.routes.append((now, item, "r2", None))
        return self._r2_route(media_id, cids)

    def _pick(self, v: NodeView, item: int, need: float, now: float) -> Route:
        self.routes.append((now, item, "node", v.index))
        return self._node_route(v, item, need)

    def release(self, route: Route | None, item: int) -> None:
        """A viewer left ``route`` (finished, or moved elsewhere)."""
        if route is None or route.node is None:
            return
        v = self.by_index[route.node]
        v.assigned_Bps = max(0.0, v.assigned_Bps - self.items[item][2])
        v.streams = max(0, v.streams - 1)
