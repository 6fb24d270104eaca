"""Replication metrics and R2 request accounting (one set per metrics registry)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

# R2 bills "class A" (writes, lists) and "class B" (reads) operations separately.
CLASS_A = frozenset(
    {
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
        "ListObjects",
        "ListMultipartUploads",
    }
)
CLASS_B = frozenset({"GetObject", "HeadObject"})


@dataclass
class R2Metrics:
    """Counters for R2 traffic and replication jobs."""

    registry: CollectorRegistry
    requests: Counter = field(init=False)
    jobs: Counter = field(init=False)
    bytes: Counter = field(init=False)
    demotions: Counter = field(init=False)
    stale: Counter = field(init=False)
    budget_refusals: Counter = field(init=False)
    pending_class_a: int = 0
    pending_class_b: int = 0

    def __post_init__(self) -> None:
        self.requests = Counter(
            "peerd_r2_requests", "R2 API requests by operation", ["op"], registry=self.registry
        )
        self.jobs = Counter(
            "peerd_r2_jobs", "Replication job outcomes", ["kind", "outcome"], registry=self.registry
        )
        self.bytes = Counter(
            "peerd_r2_bytes",
            "Bytes moved to or from R2",
            ["direction"],
            registry=self.registry,
        )
        self.demotions = Counter(
            "peerd_tiering_demotions",
            "Removals from R2 tiering planned, one per media item and round, by outcome: "
            "queued, or kept because too few full copies are known elsewhere (kept_copies) "
            "or they could not be learnt (kept_unknown)",
            ["outcome"],
            registry=self.registry,
        )
        self.stale = Counter(
            "peerd_r2_stale",
            "Blobs the catalog had in R2 that the bucket was found to lack (another node "
            "removed them), by where it was found (read_through, redirect)",
            ["found"],
            registry=self.registry,
        )

        self.budget_refusals = Counter(
            "peerd_r2_budget_refusals",
            "Class B requests not made because the month's budget is running out, by purpose "
            "(optional: prefetches; evict: HEADs before eviction; viewer: read-through GETs and "
            "HEADs before redirects, answered 503 + Retry-After instead; any: the client's last "
            "guard)",
            ["purpose"],
            registry=self.registry,
        )

    def on_request(self, op: str) -> None:
        """Count one request (counters are thread-safe, so any thread may call it)."""
        self.requests.labels(op=op).inc()
        if op in CLASS_A:
            self.pending_class_a += 1
        elif op in CLASS_B:
            self.pending_class_b += 1

    def take_pending(self) -> tuple[int, int]:
        """Class A and B requests since the last call (persisted by the tiering service)."""
        a, b = self.pending_class_a, self.pending_class_b
        self.pending_class_a -= a
        self.pending_class_b -= b
        return a, b


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, R2Metrics] = weakref.WeakKeyDictionary()


def r2_metrics(registry: CollectorRegistry) -> R2Metrics:
    """The replication metrics of ``registry``, created on first use."""
    m = _BY_REGISTRY.get(registry)
    if m is None:
        m = R2Metrics(registry)
        _BY_REGISTRY[registry] = m
    return m
