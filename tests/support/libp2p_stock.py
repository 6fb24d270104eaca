"""A stock py-libp2p host (libp2p's own API and defaults, nothing from peerd) that dials a peerd
node and checks it speaks the standard protocols: Noise + yamux upgrade, identify, ping, a
Kad-DHT provider lookup, and the ``/peerd/blob/1.0.0`` exchange as the protocol doc describes.

Run as ``python -m tests.support.libp2p_stock <peerd multiaddr> <cid> [plaintext]``; prints one
JSON object. With ``plaintext`` the host offers only the insecure transport, which peerd must
refuse. Used by the interop tests as a separate process.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any


async def check(addr: str, cid: str, plaintext: bool) -> dict[str, Any]:
    """Dial ``addr`` and exercise it; returns what was observed."""
    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.host.ping import PingService
    from libp2p.identity.identify.identify import parse_identify_response
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from libp2p.tools.anyio_service import background_trio_service

    out: dict[str, Any] = {}
    kp = create_new_key_pair()
    sec = {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)} if plaintext else None
    host = new_host(key_pair=kp, sec_opt=sec)
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            with trio.fail_after(10):
                await host.connect(info)
        except Exception as exc:
            out["connected"] = False
            out["error"] = type(exc).__name__
            return out
        out["connected"] = True
        conn: Any = host.get_network().get_connections(info.peer_id)[0]
        out["muxer"] = type(conn.muxed_conn).__name__
        out["security"] = type(conn.muxed_conn.secured_conn).__name__

        stream = await host.new_stream(info.peer_id, [TProtocol("/ipfs/id/1.0.0")])
        raw = b""
        while True:
            try:
                chunk = await stream.read(65536)
            except Exception:
                break
            if not chunk:
                break
            raw += chunk
        n, shift, i = 0, 0, 0
        while True:  # uvarint length prefix
            b = raw[i]
            n |= (b & 0x7F) << shift
            i += 1
            shift += 7
            if not b & 0x80:
                break
        ident = parse_identify_response(raw[i : i + n])
        out["protocols"] = sorted(ident.protocols)
        out["agent"] = ident.agent_version

        rtts = await PingService(host).ping(info.peer_id, ping_amt=2)
        out["ping_us"] = rtts

        dht = KadDHT(host, DHTMode.CLIENT)
        async with background_trio_service(dht):
            await dht.add_peer(info.peer_id)
            # peerd announces only once it has a peer (this host): asked before its next
            # provide round, it knows no provider yet. Ask again, as a client would, for 30 s.
            providers: list[Any] = []
            with trio.move_on_after(30):
                while True:
                    providers = await dht.find_providers(cid)
                    if providers:
                        break
                    await trio.sleep(0.25)
            out["providers"] = sorted({str(p.peer_id) for p in providers})

        blob = await host.new_stream(info.peer_id, [TProtocol("/peerd/blob/1.0.0")])
        await blob.write(cid.encode() + b"\n")
        data = b""
        while True:
            try:
                chunk = await blob.read(1 << 20)
            except Exception:
                break
            if not chunk:
                break
            data += chunk
        out["blob_status"] = data[0] if data else None
        size = int.from_bytes(data[1:9], "big") if len(data) >= 9 else -1
        body = data[9:]
        out["blob_size_ok"] = size == len(body)
        out["blob_sha256"] = hashlib.sha256(body).hexdigest()
    return out


def main() -> None:
    """Entry point."""
    import trio

    addr, cid = sys.argv[1], sys.argv[2]
    plaintext = len(sys.argv) > 3 and sys.argv[3] == "plaintext"
    result = trio.run(check, addr, cid, plaintext)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
