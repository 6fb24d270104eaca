"""What this month's R2 request budgets still allow: the one place every path that spends a
request asks.

A :class:`RequestLedger` knows the month's counts as the catalog recorded them (the ``usage``
table, ``r2_requests``; loaded once with :meth:`RequestLedger.load`, then kept up to date by the
tiering service, which persists the counts, through :meth:`RequestLedger.recorded`) plus the
requests made since and not recorded yet (``R2Metrics.pending_class_*``, counted as each
request is sent). The decisions are pure (:func:`peerd.core.tiering.spendable`); this module
only holds the counts.

Who asks, for what purpose (see the degradation order in :mod:`peerd.core.tiering`):

* the resolver, before prefetching a segment no viewer asked for yet (``optional``);
* eviction, for the HEADs of blobs not confirmed in the bucket a short while ago (``evict``);
* the R2 source before a read-through GET, and :class:`~peerd.replication.source.BucketLink`
  before the HEAD that precedes a redirect (``viewer``);
* the R2 client itself, before *every* class B request (:meth:`RequestLedger.on_request`): none
  goes out once the budget is used up (:class:`~peerd.errors.BudgetSpent`), so retries and
  resumed bodies cannot overrun it either.

A refusal is counted in ``peerd_r2_budget_refusals_total{purpose}`` and logged once per purpose
and month (a node past its budget would otherwise log every viewer's request).
"""

from __future__ import annotations

import datetime
import logging
import time
import weakref
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from peerd.catalog import Catalog
from peerd.catalog.usage import usage_since
from peerd.core.tiering import Purpose, spendable
from peerd.errors import BudgetSpent
from peerd.replication.metrics import CLASS_B, R2Metrics, r2_metrics
from peerd.runtime import Runtime

log = logging.getLogger("peerd.replication")


def month_of(now: float) -> str:
    """``YYYY-MM`` of ``now`` (UTC), the month request budgets count in."""
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m")


class RequestLedger:
    """This month's R2 requests, recorded and pending, against the node's budgets (see the
    module doc)."""

    def __init__(
        self,
        catalog: Catalog,
        metrics: R2Metrics,
        budgets: Callable[[], tuple[int, int]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.metrics = metrics
        self._budgets = budgets  # (class A, class B) a month, read at each use: settings change
        self._clock = clock
        self._month: str | None = None  # None: not loaded yet
        self._used_a = 0
        self._used_b = 0
        self._told: set[tuple[str, str]] = set()  # (month, purpose) refusals already logged

    @property
    def budget_a(self) -> int:
        """Class A requests allowed a month."""
        return self._budgets()[0]

    @property
    def budget_b(self) -> int:
        """Class B requests allowed a month."""
        return self._budgets()[1]

    async def load(self) -> None:
        """Read the month's recorded counts from the catalog (once; later calls do nothing)."""
        if self._month is not None:
            return
        month = month_of(self._clock())
        used = await usage_since(self.catalog, "r2_requests", month + "-01")
        if self._month is None:
            self._month = month
            self._used_a = used.get("class_a", 0)
            self._used_b = used.get("class_b", 0)

    def recorded(self, a: int, b: int, now: float) -> None:
        """The tiering service took ``a``/``b`` pending requests and records them for ``now``'s
        day: they count as recorded from here on (a new month starts from zero)."""
        month = month_of(now)
        if month != self._month:
            self._month, self._used_a, self._used_b = month, 0, 0
        self._used_a += a
        self._used_b += b

    def left_a(self) -> int:
        """Class A requests the month still allows (recorded and pending ones taken off)."""
        return self.budget_a - self._used_a - self.metrics.pending_class_a

    def left_b(self) -> int:
        """Class B requests the month still allows (recorded and pending ones taken off)."""
        return self.budget_b - self._used_b - self.metrics.pending_class_b

    def spendable(self, purpose: Purpose) -> int:
        """Class B requests ``purpose`` may still make (:func:`peerd.core.tiering.spendable`)."""
        return spendable(self.left_b(), self.budget_b, purpose)

    def allows(self, purpose: Purpose, n: int = 1) -> bool:
        """Whether ``n`` class B requests for ``purpose`` fit; a refusal is counted and logged
        once a month per purpose."""
        if self.spendable(purpose) >= n:
            return True
        self.refused(purpose)
        return False

    def refused(self, purpose: str) -> None:
        """Count (and, the first time this month, log) a request not made for want of
        budget."""
        self.metrics.budget_refusals.labels(purpose=purpose).inc()
        key = (self._month or "", purpose)
        if key not in self._told:
            self._told.add(key)
            log.warning(
                "R2 class B budget running out; spending stopped for this purpose this month",
                extra={"purpose": purpose, "class_b_left": self.left_b(), "budget": self.budget_b},
            )

    def on_request(self, op: str) -> None:
        """The R2 client is about to send ``op``: count it, or raise :class:`BudgetSpent` if it
        is a class B request the month no longer allows (the last guard: purposes are
        checked before, see the module doc)."""
        if op in CLASS_B and self.left_b() <= 0:
            self.refused("any")
            raise BudgetSpent(f"R2 class B budget of {self.budget_b} a month used up")
        self.metrics.on_request(op)


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, RequestLedger] = (
    weakref.WeakKeyDictionary()
)


def request_ledger(rt: Runtime) -> RequestLedger:
    """The ledger of the node whose runtime is ``rt`` (one per metrics registry, as
    :func:`~peerd.replication.metrics.r2_metrics`), created on first use from ``[r2]``."""
    registry = rt.metrics.registry
    ledger = _BY_REGISTRY.get(registry)
    if ledger is None:

        def budgets() -> tuple[int, int]:
            cfg = rt.settings.r2
            return cfg.budget_class_a_per_month, cfg.budget_class_b_per_month

        ledger = RequestLedger(rt.catalog, r2_metrics(registry), budgets)
        _BY_REGISTRY[registry] = ledger
    return ledger
