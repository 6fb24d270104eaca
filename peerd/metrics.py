"""Prometheus metrics: one registry per runtime, so tests and multiple nodes in one process
never share counters. Subsystems define their metrics on ``rt.metrics.registry`` with the
``peerd_`` prefix; the common ones live here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    """The registry and the metrics shared across subsystems."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.up = Gauge("peerd_up", "1 while the daemon is running", registry=self.registry)
        self.service_restarts = Counter(
            "peerd_service_restarts",
            "Service restarts by the supervisor",
            ["service"],
            registry=self.registry,
        )
        self.store_bytes = Gauge(
            "peerd_store_bytes", "Bytes of blobs held locally", registry=self.registry
        )
        self.store_blobs = Gauge("peerd_store_blobs", "Blobs held locally", registry=self.registry)
        self.store_writes = Counter(
            "peerd_store_writes", "Blobs written to the store", ["kind"], registry=self.registry
        )
        self.bytes_served = Counter(
            "peerd_bytes_served",
            "Bytes served to viewers or peers by the source they came from",
            ["source"],
            registry=self.registry,
        )
        # Reported by the viewers' players (peerd.http.swarm beacons): "peer" bytes are uplink
        # bytes the node did not send.
        self.swarm_viewer_bytes = Counter(
            "peerd_swarm_viewer_bytes",
            "Segment bytes viewers' players received, by source (peer: from another viewer over "
            "WebRTC, verified; http: from the node or its origin), as the players report them",
            ["source"],
            registry=self.registry,
        )
        self.uplink_overflow = Counter(
            "peerd_uplink_overflow",
            "Streams not admitted under the uplink budget, by answer (redirect: an HLS blob "
            "request sent to the bucket; refused: 503, a blob the bucket lacks or a WHEP offer; "
            "floor: a new HLS stream the bucket cannot take, served at its lowest rendition)",
            ["answer"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
