"""The testbed's network: one namespace per node ("home"), joined to the host by a bridge.

Every home has a veth into the bridge ``tb<tag>`` (the "internet"; the host is ``.254`` on it and
runs the viewers, the coordinator and the R2 proxy). The home's uplink is capped with ``tbf`` on
the inner end (what the node sends: viewers' segments, answers to peers), its downlink with
``tbf`` on the outer end. Two homes of one LAN pair also share a direct veth (``10.208.x.0/30``):
mDNS and node-to-node HTTP run on it, uncapped and ~0 ms apart.

Latency: this kernel has no ``netem``; WAN delays are added in user space (the viewer model
waits a home's RTT per request, the R2 proxy delays every request and answer).

A partition blocks the LAN link of a pair (``ip link set down`` on one end); :func:`heal` undoes it.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from dataclasses import dataclass, field


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raises with ip's message on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)  # noqa: S603, S607
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def tc(ns: str | None, *args: str) -> None:
    """Run ``tc ARGS`` (inside namespace ``ns`` when given)."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["tc", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def tbf(ns: str | None, dev: str, mbit: float) -> None:
    """Cap ``dev``'s egress at ``mbit`` Mbit/s with a token bucket (50 ms of queue)."""
    burst = max(16_000, int(mbit * 1e6 / 8 / 100))  # 10 ms worth, at least 16 kB
    tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
       "burst", str(burst), "latency", "50ms")  # fmt: skip


@dataclass
class Home:
    """One node's namespace."""

    index: int
    ns: str
    addr: str
    inner: str
    outer: str
    uplink_mbit: float
    downlink_mbit: float
    rtt_s: float
    lan_addr: str | None = None
    lan_dev: str | None = None
    lan_peer: int | None = None


@dataclass
class Network:
    """The bridge, the homes and the LAN links; :meth:`close` removes them all."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    homes: list[Home] = field(default_factory=list)
    host_addr: str = ""
    bridge: str = ""
    _made: list[tuple[str, str]] = field(default_factory=list)

    def build(
        self,
        uplinks_mbit: list[float],
        rtts_s: list[float],
        lan_pairs: list[tuple[int, int]],
        downlink_mbit: float = 100.0,
    ) -> Network:
        """Create the bridge, one namespace per entry of ``uplinks_mbit`` and the LAN links."""
        octet = int(self.tag[:2], 16)
        net = f"10.207.{octet}"
        self.bridge = f"tb{self.tag}"
        self.host_addr = f"{net}.254"
        ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (up, rtt) in enumerate(zip(uplinks_mbit, rtts_s, strict=True)):
            ns = f"tb{self.tag}n{i}"
            ip("netns", "add", ns)
            self._made.append(("netns", ns))
            outer, inner = f"tv{self.tag}{i}", f"ti{self.tag}{i}"
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", self.bridge)
            ip("link", "set", outer, "up")
            addr = f"{net}.{i + 1}"
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            tbf(ns, inner, up)
            tbf(None, outer, downlink_mbit)
            self.homes.append(Home(i, ns, addr, inner, outer, up, downlink_mbit, rtt))
        for k, (a, b) in enumerate(lan_pairs):
            ha, hb = self.homes[a], self.homes[b]
            da, db = f"tl{self.tag}{k}a", f"tl{self.tag}{k}b"
            ip(
                "link",
                "add",
                da,
                "netns",
                ha.ns,
                "type",
                "veth",
                "peer",
                "name",
                db,
                "netns",
                hb.ns,
            )
            base = 4 * k
            ha.lan_addr, hb.lan_addr = f"10.208.{octet}.{base + 1}", f"10.208.{octet}.{base + 2}"
            for h, dev in ((ha, da), (hb, db)):
                ip("-n", h.ns, "addr", "add", f"{h.lan_addr}/30", "dev", dev)
                ip("-n", h.ns, "link", "set", dev, "up", "multicast", "on")
                h.lan_dev = dev
            ha.lan_peer, hb.lan_peer = b, a
        return self

    def partition(self, a: int) -> None:
        """Cut home ``a``'s LAN link (its pair can no longer reach it)."""
        h = self.homes[a]
        assert h.lan_dev is not None
        ip("-n", h.ns, "link", "set", h.lan_dev, "down")

    def heal(self, a: int) -> None:
        """Undo :meth:`partition`."""
        h = self.homes[a]
        assert h.lan_dev is not None
        ip("-n", h.ns, "link", "set", h.lan_dev, "up")

    def close(self) -> None:
        """Delete every namespace and the bridge (the veths go with them)."""
        for kind, name in reversed(self._made):
            with contextlib.suppress(RuntimeError):
                if kind == "netns":
                    ip("netns", "del", name)
                else:
                    ip("link", "del", name)
        self._made.clear()
