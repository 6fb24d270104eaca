"""peerd: a self-hosted media peer node.

Packages media into deterministic, content-addressed HLS, serves it over HTTP behind a Cloudflare
Tunnel, shares it with LAN and libp2p peers, and tiers it to and from Cloudflare R2.
"""

__version__ = "0.1.0"
