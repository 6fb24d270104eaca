"""The mDNS service: advertise, browse, keep the LAN peer directory (see the package doc)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import ifaddr
from prometheus_client import Gauge
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peerd import __version__
from peerd.discovery.directory import PeerDirectory
from peerd.runtime import Runtime

log = logging.getLogger("peerd.discovery")

PEERD_TYPE = "_peerd._tcp.local."
P2P_TYPE = "_p2p._udp.local."
RESOLVE_MS = 3000
WILDCARDS = {"0.0.0.0", "::", ""}  # noqa: S104 - names wildcard binds, binds nothing


def txt_strings(entries: list[bytes]) -> bytes:
    """Raw DNS TXT rdata from strings (each length-prefixed, at most 255 bytes)."""
    out = bytearray()
    for e in entries:
        if len(e) > 255:
            raise ValueError("TXT string longer than 255 bytes")
        out += bytes([len(e)]) + e
    return bytes(out)


def parse_txt(raw: bytes) -> list[bytes]:
    """Split raw TXT rdata into its strings."""
    out, i = [], 0
    while i < len(raw):
        n = raw[i]
        out.append(raw[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def local_ipv4() -> list[str]:
    """Non-loopback IPv4 addresses of this machine."""
    addrs: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                a = ipaddress.ip_address(ip.ip)
                if not a.is_loopback and not a.is_link_local:
                    addrs.append(ip.ip)
    return sorted(set(addrs))


class MdnsService:
    """Advertises this node and browses for others on the LAN."""

    name = "mdns"

    def __init__(
        self,
        rt: Runtime,
        directory: PeerDirectory,
        http_port: Callable[[], int | None],
        p2p: Any = None,
        closers: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self.rt = rt
        self.cfg = rt.settings.mdns
        self.directory = directory
        self.http_port = http_port
        self.p2p = p2p  # peerd.p2p.service.P2PService or None
        self.closers = list(closers)  # e.g. the LAN source's HTTP client, closed on stop
        self.peer_id = rt.identity.peer_id
        self.aiozc: AsyncZeroconf | None = None
        self._infos: list[AsyncServiceInfo] = []
        self._announced: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._names: dict[str, str] = {}  # service name -> peer id
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        Gauge(
            "peerd_lan_peers",
            "LAN peers this node fetches from: found by mDNS, still answering, not banned",
            registry=rt.metrics.registry,
        ).set_function(lambda: len(directory.order()))

    # -- addresses -------------------------------------------------------------------------------

    def addresses(self) -> list[str]:
        """IPv4 addresses to advertise for the HTTP port."""
        if self.cfg.advertise_addresses:
            return list(self.cfg.advertise_addresses)
        host = self.rt.settings.http.host
        if host in WILDCARDS:
            return local_ipv4()
        if ipaddress.ip_address(host).is_loopback and not self._loopback_only():
            # Peers on the LAN cannot reach a loopback listener: advertising it would send them
            # to themselves. The node still browses and fetches from others.
            return []
        return [host]

    def _loopback_only(self) -> bool:
        ifs = self.cfg.interfaces
        return bool(ifs) and all(ipaddress.ip_address(i).is_loopback for i in ifs)

    def dnsaddrs(self, addrs: list[str]) -> list[str]:
        """libp2p multiaddrs to advertise, wildcard hosts replaced by the LAN addresses."""
        if self.p2p is None or not self.p2p.addrs:
            return []
        out: list[str] = []
        for ma in self.p2p.addrs:
            if "/ip4/0.0.0.0/" in ma:
                out += [ma.replace("/ip4/0.0.0.0/", f"/ip4/{a}/") for a in addrs]
            else:
                out.append(ma)
        if "/p2p/" not in "".join(out):
            out = [f"{m}/p2p/{self.peer_id}" for m in out]
        return out

    def _build(
        self, addrs: list[str], dnsaddrs: list[str], lan: list[str]
    ) -> list[AsyncServiceInfo]:
        port = self.http_port() or 0
        packed = [socket.inet_aton(a) for a in addrs]
        server = f"peerd-{self.peer_id[-12:].lower()}.local."
        # How long peers' caches keep these records once this node stops answering: the bound
        # on how long a node that dies without a goodbye stays in its peers' tables.
        ttl = math.ceil(self.cfg.peer_ttl_s)
        props: dict[str, str] = {"id": self.peer_id, "v": __version__, "port": str(port)}
        if self.rt.settings.node.public_url:
            props["url"] = self.rt.settings.node.public_url
        infos: list[AsyncServiceInfo] = []
        if addrs:
            infos.append(
                AsyncServiceInfo(
                    PEERD_TYPE,
                    f"{self.peer_id}.{PEERD_TYPE}",
                    addresses=packed,
                    port=port,
                    properties=props,
                    server=server,
                    host_ttl=ttl,
                    other_ttl=ttl,
                )
            )
        if dnsaddrs:
            p2p_port = (
                int(dnsaddrs[0].split("/tcp/")[1].split("/")[0]) if "/tcp/" in dnsaddrs[0] else 0
            )
            infos.append(
                AsyncServiceInfo(
                    P2P_TYPE,
                    f"{self.peer_id}.{P2P_TYPE}",
                    addresses=[socket.inet_aton(a) for a in lan],
                    port=p2p_port,
                    properties=txt_strings([f"dnsaddr={m}".encode() for m in dnsaddrs]),
                    server="p2p-" + server,
                    host_ttl=ttl,
                    other_ttl=ttl,
                )
            )
        return infos

    # -- run ---------------------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None]) -> None:
        """Register, browse, re-announce on address changes, check that peers still answer;
        withdraw on stop."""
        await self.directory.load()
        interfaces = list(self.cfg.interfaces) or InterfaceChoice.All
        self.aiozc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        browser: AsyncServiceBrowser | None = None
        try:
            await self._announce()
            browser = AsyncServiceBrowser(
                self.aiozc.zeroconf, [PEERD_TYPE, P2P_TYPE], handlers=[self._on_change]
            )
            ready()
            while True:
                await asyncio.sleep(self.cfg.recheck_s)
                await self._announce()
                self.directory.expire()  # ended bans of peers that are gone
                names = [n for n in self._names if n.endswith("." + PEERD_TYPE)]
                await asyncio.gather(*(self._check(n) for n in names))
        finally:
            await asyncio.shield(self._close(browser))

    async def _close(self, browser: AsyncServiceBrowser | None) -> None:
        for t in list(self._tasks):
            t.cancel()
        if browser is not None:
            await browser.async_cancel()
        if self.aiozc is not None:
            # Goodbye packets: peers drop this node at once instead of waiting for expiry.
            await self.aiozc.async_unregister_all_services()
            await self.aiozc.async_close()
        if self._session is not None:
            await self._session.close()
        for close in self.closers:
            await close()
        await self.directory.flush()
        log.info("mdns withdrawn")

    async def _announce(self) -> None:
        assert self.aiozc is not None
        addrs = self.addresses()
        lan = list(self.cfg.advertise_addresses) or (
            list(self.cfg.interfaces) if self._loopback_only() else local_ipv4()
        )
        dnsaddrs = self.dnsaddrs(lan)
        key = (tuple(addrs), tuple(dnsaddrs))
        if key == self._announced:
            return
        infos = self._build(addrs, dnsaddrs, lan)
        if not addrs and self._announced is None:
            log.warning(
                "not advertising on the LAN: [http] host is a loopback address; set it (or "
                "[mdns] advertise_addresses) to a LAN address for LAN transfers"
            )
        if self._announced is None:
            for info in infos:
                await self.aiozc.async_register_service(info, allow_name_change=False)
        else:
            log.info("addresses changed; re-announcing", extra={"addrs": addrs})
            old = {i.type: i for i in self._infos}
            new = {i.type for i in infos}
            for info in infos:
                if info.type in old:
                    await self.aiozc.async_update_service(info)
                else:
                    await self.aiozc.async_register_service(info)
            for kind, info in old.items():
                if kind not in new:
                    await self.aiozc.async_unregister_service(info)
        self._infos = infos
        self._announced = key
        # Node info for the coordinator API (``addresses.lan``): where LAN peers reach us.
        port = self.http_port() or 0
        self.rt.node.lan_urls = [f"http://{a}:{port}" for a in addrs] if port else []
        log.info("mdns announced", extra={"addrs": addrs, "dnsaddrs": dnsaddrs})

    # -- browsing ----------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            pid = self._names.pop(name, None)
            if pid is not None and service_type == PEERD_TYPE:
                log.info("peer withdrew", extra={"peer": pid})
                self.directory.gone(pid)
            return
        self._spawn(self._resolve(service_type, name))

    async def _check(self, name: str) -> None:
        """Is the peer behind ``name`` still there? zeroconf answers from its cache while the
        peer's records live, and asks the peer once they expired: a live peer answers and
        stays (its records refreshed, its RTT probed); one that does not is dropped. Its name is
        kept until the browser reports it Removed, so a peer back within that time is found
        again here."""
        assert self.aiozc is not None
        info = AsyncServiceInfo(PEERD_TYPE, name)
        if await info.async_request(self.aiozc.zeroconf, RESOLVE_MS):
            await self._peerd_seen(name, info)
            return
        pid = self._names.get(name)
        if pid is None:
            return
        if self.directory.known(pid):
            log.info("peer expired", extra={"peer": pid, "reason": "records expired, no answer"})
        self.directory.gone(pid)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self.aiozc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.aiozc.zeroconf, RESOLVE_MS):
            return
        if service_type == PEERD_TYPE:
            await self._peerd_seen(name, info)
        else:
            await self._p2p_seen(name, info)

    async def _peerd_seen(self, name: str, info: AsyncServiceInfo) -> None:
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        pid = props.get("id", "")
        if not pid or pid == self.peer_id:
            return
        self._names[name] = pid
        addrs = info.parsed_addresses(IPVersion.V4Only)
        port = info.port
        if not addrs or not port:
            return
        url = f"http://{addrs[0]}:{port}"
        self.directory.seen(pid, url=url, version=props.get("v"))
        await self._probe(pid, url)

    async def _p2p_seen(self, name: str, info: AsyncServiceInfo) -> None:
        if self.p2p is None:
            return
        dnsaddrs = [
            s[len(b"dnsaddr=") :].decode()
            for s in parse_txt(info.text)
            if s.startswith(b"dnsaddr=")
        ]
        for ma in dnsaddrs:
            if ma.endswith(f"/p2p/{self.peer_id}") or "/ws" in ma:
                continue
            self._names[name] = ma.rsplit("/p2p/", 1)[-1]
            if await self.p2p.connect(ma) is not None:
                log.info("libp2p peer found on the LAN", extra={"addr": ma})
                return

    async def _probe(self, pid: str, url: str) -> None:
        """Measure the round trip to a peer's ``/healthz`` (orders LAN peers)."""
        assert self._session is not None
        started = time.monotonic()
        try:
            async with self._session.get(url + "/healthz") as resp:
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            ok = False
        if ok:
            self.directory.rtt(pid, (time.monotonic() - started) * 1000)
        else:
            self.directory.report(pid, False, "unreachable")
