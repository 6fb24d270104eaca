"""Playback analytics: viewer sessions from CMCD and WHEP reports, hourly rollups, anomalies.

Theory of operation. The node sees every request of its viewers. A request that carries CMCD
(:mod:`peerd.core.cmcd`) becomes a :class:`Hit`; reports of WHEP sessions (the node's peer
connection statistics) and of players that measure themselves (the swarm player's beacon) go
to :meth:`Analytics.reported`. :class:`Analytics` is a
pure state machine over them: it takes ``now`` (seconds, one clock for everything) in every
call and returns the :class:`Event` values that happened, so the service around it only logs,
counts and stores.

A *session* is one playback: the CMCD session id ``sid`` (hls.js makes one per player), else
the viewer's token and address, under the media id. It goes through::

    seen ──(a segment request with bl > 0)──► started ──(idle for idle_s)──► gone
      │                                         │
      │                                         └─ each request with bs (buffer starvation
      │                                            since the previous video request): a stall
      └──(startup_timeout_s after its first request, not started)──► failed ──► gone

* **Startup time** is the time from the session's first request (its master or media
  playlist) to its first segment request sent while the player had media buffered
  (CMCD ``bl`` > 0, which hls.js rounds to 100 ms: at least 50 ms buffered). hls.js starts
  playing as soon as the first segment is appended, so this is the time to the player's first
  playable media, measured on the node's clock between two request arrivals. A request with
  ``su`` absent (the player reports it is not starting) starts a session too, for players that
  send no ``bl``. A WHEP session starts when the viewer first reports media received (its
  RTCP receiver reports, read from the node's side of the peer connection). A reporting
  player gives its own startup time.
* **A stall** is a request with ``bs`` (hls.js sets it on the next video request after a
  ``waiting`` event during playback; several ``waiting`` events before that request are one
  stall). A WHEP session's stalls are its freezes (runs of seconds with more than 5% of the
  packets lost), a reporting player's the stalls it counted. The *stall rate* is stalls per
  started session; the rollup also keeps the sessions that stalled at least once.
* **A failure** is a session that never started: it is decided ``startup_timeout_s`` after its
  first request (a player that cannot decode the codec stops after the master playlist; one
  whose requests all fail never sends a request with ``bl`` > 0).

A session is counted once, when it starts or fails, under the dimensions it has then: media,
rendition (of its latest segment or media playlist request), codec string (of that rendition,
or the media's first video rendition for a session that only read the master), delivery path
(``http``, ``whep`` or ``swarm``) and region (the ``CF-IPCountry`` a trusted proxy added, else
empty). Stalls count under the dimensions of the request that reported them.

**Rollup.** Counts accumulate per (UTC hour, dimensions) in :class:`Bucket` values that only
grow, handed out as deltas by :meth:`Analytics.drain` (the service adds them to SQLite).
Startup times go into fixed histogram buckets (:data:`STARTUP_BOUNDS`), from which p50 and p95
are estimated (:func:`quantile`).

**Anomalies.** Every ``window_s`` the sessions counted in the window are grouped by (codec
family, region). For each group with at least ``min_sessions`` sessions, the failure rate
(failures / sessions) and the stall rate (stalls / sessions) are compared with that group's
exponentially weighted baseline (weight ``alpha`` per window; a new group starts from the prior
rates): ``z = (observed - baseline) / sqrt(b * (1 - b) / n)`` for failures (binomial, with
``b = max(baseline, floor)``) and ``sqrt(b / n)`` for stalls (Poisson). ``z >= z_threshold``
raises one :class:`Anomaly` (what, baseline, observed, z), once: the same group and kind raises
again only after a window back under the threshold. The baseline is updated after the test,
so a lasting change becomes the new normal.

Labels for Prometheus are bounded: codec *families* (:data:`CODEC_FAMILIES`, else ``other``),
the three paths, and at most ``max_regions`` region codes (the first ones seen; later ones are
``other``): :class:`Bounded`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peerd.core.cmcd import Cmcd

PATHS = ("http", "whep", "swarm")
CODEC_FAMILIES = frozenset(("avc1", "avc3", "hvc1", "hev1", "av01", "vp09", "vp08", "mp4a"))
STARTUP_BOUNDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # seconds; one more bucket: above the last
MAX_DIM = 64  # characters of a rendition id, codec string or region kept


@dataclass(frozen=True, slots=True)
class Dims:
    """The dimensions a count is kept under."""

    media: str
    rendition: str = ""
    codec: str = ""
    path: str = "http"
    region: str = ""


@dataclass(frozen=True, slots=True)
class Hit:
    """One viewer request with CMCD (``playlist``: a master or media playlist)."""

    session: str
    dims: Dims
    playlist: bool
    cmcd: Cmcd


@dataclass(frozen=True, slots=True)
class Started:
    """A session started playing ``startup_s`` after its first request."""

    session: str
    dims: Dims
    startup_s: float


@dataclass(frozen=True, slots=True)
class Failed:
    """A session never started within the startup timeout."""

    session: str
    dims: Dims


@dataclass(frozen=True, slots=True)
class Stalled:
    """A started session reported a stall."""

    session: str
    dims: Dims


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A (codec family, region) group's failure or stall rate jumped over its baseline."""

    kind: str  # "failure" or "stall"
    codec: str
    region: str
    baseline: float
    observed: float
    z: float
    sessions: int
    at: float

    def explain(self) -> str:
        """One sentence for the log and the dashboard."""
        where = f"codec {self.codec}" + (f" in {self.region}" if self.region else "")
        return (
            f"{self.kind} rate {self.observed:.2f} over {self.sessions} sessions of {where}, "
            f"baseline {self.baseline:.2f} (z={self.z:.1f})"
        )


Event = Started | Failed | Stalled | Anomaly


@dataclass
class Bucket:
    """Counts of one (hour, dimensions); every field only grows."""

    sessions: int = 0
    started: int = 0
    failures: int = 0
    stalls: int = 0
    stalled_sessions: int = 0
    startup_sum: float = 0.0
    startup_hist: list[int] = field(default_factory=lambda: [0] * (len(STARTUP_BOUNDS) + 1))


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The anomaly detector's settings (``[analytics]``)."""

    window_s: float = 300.0
    min_sessions: int = 10
    z_threshold: float = 3.0
    alpha: float = 0.2
    prior_failure: float = 0.05
    prior_stall: float = 0.2
    floor: float = 0.02


@dataclass
class _Session:
    first_at: float
    last_at: float
    dims: Dims
    started: bool = False
    stalled: bool = False
    freezes: int = 0  # a WHEP session's freezes (a reporting player's stalls) counted so far


@dataclass
class _Window:
    sessions: int = 0
    failures: int = 0
    stalls: int = 0


class Bounded:
    """At most ``size`` distinct label values; later ones are ``other``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        """The label for ``value``."""
        if value in self.seen:
            return value
        if len(self.seen) < self.size:
            self.seen.add(value)
            return value
        return "other"


def codec_family(codec: str) -> str:
    """The bounded label of a codec string: the first codec's four-character code."""
    head = codec.split(",", 1)[0].strip()[:4]
    return head if head in CODEC_FAMILIES else ("" if not codec else "other")


def hour_of(now: float) -> int:
    """The start of ``now``'s UTC hour (Unix seconds)."""
    return int(now // 3600) * 3600


def quantile(hist: list[int], q: float) -> float | None:
    """The ``q`` quantile of startup times from histogram counts (the upper bound of the bucket
    it falls in; the last, open bucket answers its lower bound), None without counts."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            return STARTUP_BOUNDS[min(i, len(STARTUP_BOUNDS) - 1)]
    return STARTUP_BOUNDS[-1]


class Analytics:
    """Sessions, rollup deltas and the anomaly detector of one node."""

    def __init__(
        self,
        now: float,
        *,
        startup_timeout_s: float = 20.0,
        idle_s: float = 60.0,
        thresholds: Thresholds | None = None,
        max_sessions: int = 10_000,
    ) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.idle_s = idle_s
        self.t = thresholds or Thresholds()
        self.max_sessions = max_sessions
        self.sessions: dict[str, _Session] = {}
        self.pending: dict[tuple[int, Dims], Bucket] = {}
        self.window_end = now + self.t.window_s
        self.window: dict[tuple[str, str], _Window] = {}
        self.baseline: dict[tuple[str, str, str], float] = {}
        self.active: set[tuple[str, str, str]] = set()
        self.recent: list[Anomaly] = []  # newest last, at most 50
        self.dropped = 0  # hits of new sessions refused at max_sessions

    # -- intake ----------------------------------------------------------------------------

    def observe(self, hit: Hit, now: float) -> list[Event]:
        """Account for one request; the events it caused."""
        s = self.sessions.get(hit.session)
        if s is None:
            if len(self.sessions) >= self.max_sessions:
                self.dropped += 1
                return []
            s = self.sessions[hit.session] = _Session(now, now, hit.dims)
        s.last_at = now
        s.dims = _merge(s.dims, hit.dims)
        c = hit.cmcd
        events: list[Event] = []
        if not s.started and not hit.playlist and ((c.bl or 0) > 0 or not c.su):
            events.append(self._start(hit.session, s, now - s.first_at, now))
        if c.bs:  # hls.js sets it only once playback began
            events.append(self._stall(hit.session, s, hit.dims, now))
        return events

    def reported(
        self,
        session: str,
        dims: Dims,
        *,
        startup_s: float | None,
        stalls: int,
        failed: bool,
        now: float,
    ) -> list[Event]:
        """A session's report (a WHEP session's statistics, the swarm player's beacon): its
        startup time once it played, its stalls so far, and whether it gave up (a fatal error
        before playing)."""
        s = self.sessions.get(session)
        if s is None:
            if len(self.sessions) >= self.max_sessions:
                self.dropped += 1
                return []
            s = self.sessions[session] = _Session(now, now, dims)
        s.last_at = now
        s.dims = _merge(s.dims, dims)
        events: list[Event] = []
        if not s.started and startup_s is not None:
            events.append(self._start(session, s, startup_s, now))
        elif not s.started and failed:
            events.append(self._fail(session, s, now))
            return events
        if s.started:
            for _ in range(max(0, stalls - s.freezes)):
                events.append(self._stall(session, s, s.dims, now))
            s.freezes = max(s.freezes, stalls)
        return events

    def _fail(self, key: str, s: _Session, now: float) -> Failed:
        b = self._bucket(now, s.dims)
        b.sessions += 1
        b.failures += 1
        w = self._window(s.dims)
        w.sessions += 1
        w.failures += 1
        del self.sessions[key]
        return Failed(key, s.dims)

    def _start(self, key: str, s: _Session, startup_s: float, now: float) -> Started:
        s.started = True
        b = self._bucket(now, s.dims)
        b.sessions += 1
        b.started += 1
        b.startup_sum += startup_s
        b.startup_hist[_bucket_index(startup_s)] += 1
        self._window(s.dims).sessions += 1
        return Started(key, s.dims, startup_s)

    def _stall(self, key: str, s: _Session, dims: Dims, now: float) -> Stalled:
        b = self._bucket(now, dims)
        b.stalls += 1
        if not s.stalled:
            s.stalled = True
            b.stalled_sessions += 1
        self._window(dims).stalls += 1
        return Stalled(key, dims)

    # -- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Event]:
        """Decide failures, forget idle sessions, and close the anomaly window when due."""
        events: list[Event] = []
        for key, s in list(self.sessions.items()):
            if not s.started and now - s.first_at >= self.startup_timeout_s:
                events.append(self._fail(key, s, now))
            elif s.started and now - s.last_at >= self.idle_s:
                del self.sessions[key]
        if now >= self.window_end:
            events.extend(self._close_window(now))
            # A long pause closes one window, not every window it spans.
            self.window_end = now + self.t.window_s
        return events

    def _close_window(self, now: float) -> list[Anomaly]:
        t = self.t
        found: list[Anomaly] = []
        for (codec, region), w in sorted(self.window.items()):
            if w.sessions < t.min_sessions:
                continue
            n = w.sessions
            for kind, observed, prior in (
                ("failure", w.failures / n, t.prior_failure),
                ("stall", w.stalls / n, t.prior_stall),
            ):
                key = (kind, codec, region)
                base = self.baseline.get(key, prior)
                b = max(base, t.floor)
                sd = math.sqrt(b * max(1 - b, t.floor) / n if kind == "failure" else b / n)
                z = (observed - base) / sd
                if z >= t.z_threshold:
                    if key not in self.active:
                        self.active.add(key)
                        a = Anomaly(kind, codec, region, base, observed, z, n, now)
                        found.append(a)
                        self.recent = [*self.recent[-49:], a]
                else:
                    self.active.discard(key)
                self.baseline[key] = (1 - t.alpha) * base + t.alpha * observed
        self.window.clear()
        return found

    # -- rollup ----------------------------------------------------------------------------

    def drain(self) -> dict[tuple[int, Dims], Bucket]:
        """The counts added since the last drain, by (hour, dimensions)."""
        out, self.pending = self.pending, {}
        return out

    def _bucket(self, now: float, dims: Dims) -> Bucket:
        key = (hour_of(now), dims)
        b = self.pending.get(key)
        if b is None:
            b = self.pending[key] = Bucket()
        return b

    def _window(self, dims: Dims) -> _Window:
        key = (codec_family(dims.codec), dims.region)
        w = self.window.get(key)
        if w is None:
            w = self.window[key] = _Window()
        return w


def _merge(old: Dims, new: Dims) -> Dims:
    """A session's dimensions after a request: what the request knows wins, the rest stays."""
    if old == new:
        return old
    return Dims(
        new.media or old.media,
        new.rendition or old.rendition,
        new.codec or old.codec,
        new.path,
        new.region or old.region,
    )


def _bucket_index(startup_s: float) -> int:
    for i, bound in enumerate(STARTUP_BOUNDS):
        if startup_s <= bound:
            return i
    return len(STARTUP_BOUNDS)
