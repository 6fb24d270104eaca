"""Configuration.

Sources, highest priority first: keyword arguments (tests), ``PEERD_<SECTION>__<KEY>``
environment variables (e.g. ``PEERD_HTTP__PORT=8080``), the TOML file (``--config``,
``$PEERD_CONFIG``, or none), then the defaults embedded here, which are enough to run a node.

Secrets never live in the TOML file or the environment. :meth:`Settings.secret` reads a named secret
from ``$CREDENTIALS_DIRECTORY/<name>`` (systemd ``LoadCredential=``) and then from
``<node.secrets_dir>/<name>``; values are never logged.

Each subsystem owns one section class below; every key is documented in
``config/peerd.example.toml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from peerd.errors import ConfigError
from peerd.media.options import PackagingOptions, Rung
from peerd.paths import DEFAULT_STATE_DIR


class Section(BaseModel):
    """Base of every section: unknown keys are errors, so typos are caught."""

    model_config = ConfigDict(extra="forbid")


class NodeSettings(Section):
    """Identity and directories of this node."""

    name: str = Field(default="peerd", min_length=1, max_length=64)
    state_dir: Path = DEFAULT_STATE_DIR
    cache_dir: Path | None = None
    secrets_dir: Path | None = None
    public_url: str | None = None


class StoreSettings(Section):
    """The content-addressed blob store."""

    quota_bytes: int = Field(default=0, ge=0)
    min_free_bytes: int = Field(default=512 * 1024 * 1024, ge=0)


class LogSettings(Section):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class DaemonSettings(Section):
    """The supervisor."""

    stop_timeout_s: float = Field(default=8.0, gt=0, le=60)
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    max_restarts: int = Field(default=5, ge=0)


class HttpSettings(Section):
    """The HTTP server (HLS, API, WHEP). Owned by issue 4."""

    host: str = "127.0.0.1"
    port: int = Field(default=8737, ge=0, le=65535)
    auth: Literal["token", "access"] = "token"
    signing_key_secret: str = Field(default="hls_signing_key", pattern=r"^[A-Za-z0-9_.-]+$")
    access_team_url: str | None = None
    access_aud: str | None = None
    access_keys_ttl_s: float = Field(default=3600.0, gt=0)
    access_refetch_min_s: float = Field(default=10.0, ge=0)
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    cors_origin: str = "*"
    playlist_max_age_s: int = Field(default=2, ge=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    keepalive_timeout_s: float = Field(default=75.0, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=4096, ge=1)
    max_line_size: int = Field(default=8190, ge=1024)
    max_field_size: int = Field(default=8190, ge=1024)
    max_headers: int = Field(default=64, ge=8)
    max_streams: int = Field(default=512, ge=1)
    prefetch_segments: int = Field(default=2, ge=0, le=16)
    fast_path: bool = True


class LadderRung(Section):
    """One lower rendition of the ABR ladder (never above the source's size)."""

    height: int = Field(ge=64, le=4320)
    crf: int | None = Field(default=None, ge=0, le=51)
    on_demand: bool = False
    bframes: int | None = Field(default=None, ge=0, le=16)


class LiveRungSettings(Section):
    """One rung of the live ABR ladder (:mod:`peerd.core.ladder`): height and video bitrate."""

    height: int = Field(ge=64, le=4320)
    bitrate_kbps: int = Field(ge=50, le=50_000)


class MediaSettings(Section):
    """Packaging. Owned by issue 3. Every key here changes the bytes produced (and media ids)."""

    container: Literal["fmp4", "ts"] = "fmp4"
    segment_seconds: float = Field(default=4.0, ge=1.0, le=30.0)
    transcode: Literal["auto", "always"] = "auto"
    max_height: int | None = Field(default=None, ge=64, le=4320)
    crf: int = Field(default=23, ge=0, le=51)
    audio_bitrate: int = Field(default=128_000, ge=32_000, le=512_000)
    x264_preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"
    ] = "veryfast"
    encoder_threads: int = Field(default=4, ge=1, le=32)
    ladder: list[LadderRung] = Field(default_factory=list)
    audio_only: bool = False
    watch_dirs: list[Path] = Field(default_factory=list)
    library_dirs: list[Path] = Field(default_factory=list)
    watch_settle_s: float = Field(default=5.0, ge=0.0)
    watch_interval_s: float = Field(default=2.0, gt=0.0)
    on_demand_concurrency: int = Field(default=1, ge=1, le=16)
    on_demand_ahead: int = Field(default=2, ge=0, le=16)

    def overridden(self, update: dict[str, Any]) -> MediaSettings:
        """These settings with ``update`` applied (a command line's overrides), validated.

        Raises :class:`ConfigError` naming every bad key.
        """
        if not update:
            return self
        try:
            return self.model_validate({**self.model_dump(), **update})
        except ValidationError as exc:
            raise ConfigError(f"invalid media override: {_describe(exc)}") from None

    def packaging_options(self) -> PackagingOptions:
        """These settings as `peerd.media.options.PackagingOptions`."""
        return PackagingOptions(
            container=self.container,
            segment_seconds=self.segment_seconds,
            transcode=self.transcode,
            max_height=self.max_height,
            crf=self.crf,
            audio_bitrate=self.audio_bitrate,
            preset=self.x264_preset,
            encoder_threads=self.encoder_threads,
            ladder=tuple(Rung(r.height, r.on_demand, r.crf, r.bframes) for r in self.ladder),
            audio_only=self.audio_only,
        )


class R2Settings(Section):
    """Cloudflare R2 replication and tiering. Owned by issue 5.

    R2 is used only when a bucket, an account id (or ``endpoint``) and both credential secrets
    (``r2_access_key_id``, ``r2_secret_access_key``) are present; otherwise the node runs
    without it.
    """

    account_id: str = ""
    bucket: str = ""
    endpoint: str | None = None
    region: str = "auto"
    max_concurrency: int = Field(default=8, ge=1, le=64)
    part_size_bytes: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_threshold_bytes: int = Field(default=64 * 1024 * 1024, ge=5 * 1024 * 1024)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    budget_bytes: int = Field(default=10 * 1024**3, ge=0)
    budget_class_a_per_month: int = Field(default=1_000_000, ge=0)
    budget_class_b_per_month: int = Field(default=10_000_000, ge=0)
    uplink_bytes_per_s: int = Field(default=2_500_000, ge=0)
    uplink_headroom: float = Field(default=0.6, gt=0, le=1)
    cold_bytes_per_s: float = Field(default=2000.0, ge=0)
    min_residence_s: float = Field(default=3600.0, ge=0)
    min_copies: int = Field(default=2, ge=1, le=16)
    access_half_life_s: float = Field(default=3600.0, gt=0)
    tiering_interval_s: float = Field(default=60.0, gt=0)
    evict_high_watermark: float = Field(default=0.95, gt=0, le=1)
    evict_low_watermark: float = Field(default=0.92, gt=0, le=1)
    eviction: Literal["demand", "lru"] = "demand"
    job_lease_s: float = Field(default=300.0, gt=0)
    retry_base_s: float = Field(default=2.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=12, ge=1)
    sse_c: bool = False
    public_base_url: str | None = Field(default=None, pattern=r"^https?://[^\s?#]+$")
    watch_uploads: bool = False
    uploads_prefix: str = Field(default="uploads/", pattern=r"^[^/\s][^\s]*/$")
    uploads_done: Literal["archive", "delete"] = "archive"
    archive_prefix: str = Field(default="archive/", pattern=r"^[^/\s][^\s]*/$")
    uploads_interval_s: float = Field(default=60.0, ge=0.1)
    claim_lease_s: float = Field(default=300.0, ge=1.0)
    uploads_max_bytes: int = Field(default=64 * 1024**3, ge=1)

    @model_validator(mode="after")
    def _archive_outside_uploads(self) -> R2Settings:
        # An archive inside the watched prefix would be ingested again, and again.
        a, u = self.archive_prefix, self.uploads_prefix
        if a.startswith(u) or u.startswith(a):
            raise ValueError("archive_prefix and uploads_prefix must not contain one another")
        return self

    @property
    def configured(self) -> bool:
        """True when a bucket and an endpoint (or account id) are set."""
        return bool(self.bucket and (self.endpoint or self.account_id))

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint: the override, or R2's per-account endpoint."""
        return self.endpoint or f"https://{self.account_id}.r2.cloudflarestorage.com"


class UplinkSettings(Section):
    """Uplink admission and overflow to R2 (:mod:`peerd.core.uplink`)."""

    budget_mbps: float = Field(default=0.0, ge=0)
    window_s: float = Field(default=5.0, gt=0, le=300)
    resume_ratio: float = Field(default=0.8, gt=0, le=1)
    stream_idle_s: float = Field(default=60.0, gt=0, le=3600)
    stream_mbps: float = Field(default=3.0, ge=0)
    presign_expiry_s: int = Field(default=300, ge=1, le=7 * 24 * 3600)
    retry_after_s: int = Field(default=5, ge=1, le=3600)

    @property
    def budget_bps(self) -> float:
        """The budget in bytes/s (0: off)."""
        return self.budget_mbps * 1e6 / 8


class SwarmSettings(Section):
    """The viewer swarm's tracker (:mod:`peerd.core.swarm`, :mod:`peerd.http.swarm`)."""

    enabled: bool = True
    max_peers_per_swarm: int = Field(default=200, ge=2, le=100_000)
    max_swarms_per_connection: int = Field(default=8, ge=1, le=64)
    messages_per_s: float = Field(default=5.0, gt=0, le=1000)
    max_message_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    idle_s: float = Field(default=150.0, gt=0, le=3600)
    announce_interval_s: int = Field(default=60, ge=5, le=3600)
    # The player page and beacons (peerd.http.swarm): media ids whose viewers get no swarm (the
    # tracker refuses them, the player fetches over HTTP only); where `make web-deps` put hls.js
    # and P2P Media Loader ("" = <venv>/web); how often a player reports its bytes.
    disabled_media: list[str] = Field(default_factory=list)
    relay_only: bool = False  # the player offers only TURN-relayed candidates (hides viewer IPs)
    web_dir: str = ""
    report_interval_s: float = Field(default=10.0, ge=1, le=3600)


class LiveInputSettings(Section):
    """One live input (:mod:`peerd.core.live`): a name publishers address and a secret key."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    # The secret holding this input's stream key (``Settings.secret``); "" = ``live-<name>.key``.
    key_secret: str = ""
    record: bool = True  # when the input stops, its recording becomes a media item

    @property
    def secret_name(self) -> str:
        """The name of the secret that holds the key."""
        return self.key_secret or f"live-{self.name}.key"


class LiveHandoffSettings(Section):
    """Hand-off of busy live inputs to Cloudflare Stream (:mod:`peerd.core.handoff`,
    :mod:`peerd.live.handoff`)."""

    enabled: bool = False
    account_id: str = ""
    # The secret holding a Cloudflare API token with the Stream Write permission.
    api_token_secret: str = "cloudflare-stream-token"  # noqa: S105 - a file name
    api_url: str = "https://api.cloudflare.com/client/v4"
    # Where Stream plays its live inputs ("customer-<code>.cloudflarestream.com"); "" = taken
    # from the WebRTC URLs Stream answers with.
    customer_domain: str = ""
    start_viewers: int = Field(default=50, ge=1)
    stop_viewers: int = Field(default=10, ge=0)
    start_after_s: float = Field(default=10.0, ge=0, le=3600)
    stop_after_s: float = Field(default=120.0, ge=0, le=86400)
    check_interval_s: float = Field(default=2.0, gt=0, le=60)
    # Stream deletes the recordings of a hand-off after this many days (0 = keeps them).
    delete_recording_after_days: int = Field(default=0, ge=0)
    retry_max_s: float = Field(default=30.0, gt=0, le=600)
    # CA certificates (PEM) Stream's RTMPS server is verified against; None = the system's.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _thresholds(self) -> LiveHandoffSettings:
        if self.stop_viewers >= self.start_viewers:
            raise ValueError("live.handoff: stop_viewers must be below start_viewers")
        if self.enabled and not self.account_id:
            raise ValueError("live.handoff: enabled needs account_id")
        return self


class LiveSettings(Section):
    """Live streaming (:mod:`peerd.live`): inputs, ingest listeners, low-latency HLS shape."""

    enabled: bool = True
    inputs: list[LiveInputSettings] = Field(default_factory=list)
    # RTMP and RTMPS listeners ("" = off); RTMPS needs a certificate chain and its key (PEM).
    rtmp_listen: str = "127.0.0.1:1935"
    rtmps_listen: str = ""
    rtmps_cert: Path | None = None
    rtmps_key: Path | None = None
    # SRT listener host:port ("" = off): input i (from 0) listens on port + i, through ffmpeg.
    srt_listen: str = ""
    whip: bool = True
    # Low-latency HLS: part and segment targets (segments cut at keyframes), playlist window.
    part_s: float = Field(default=0.5, ge=0.1, le=2.0)
    segment_s: float = Field(default=2.0, ge=0.5, le=10.0)
    window_segments: int = Field(default=6, ge=3, le=100)
    # ABR ladder (off while empty): rungs below the publisher's own height, transcoded from one
    # decode per input, within ladder_cpu_percent of one core for every input together.
    ladder: list[LiveRungSettings] = Field(default_factory=list)
    ladder_cpu_percent: float = Field(default=100.0, gt=0, le=6400)
    ladder_window_s: float = Field(default=5.0, ge=1.0, le=300.0)  # over budget this long: drop
    # A publisher silent this long has vanished: its publication ends.
    idle_timeout_s: float = Field(default=10.0, gt=0, le=300)
    handoff: LiveHandoffSettings = LiveHandoffSettings()

    @model_validator(mode="after")
    def _unique_names(self) -> LiveSettings:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("live input names must be unique")
        heights = [r.height for r in self.ladder]
        if len(set(heights)) != len(heights):
            raise ValueError("live ladder rungs must have different heights")
        return self


class MdnsSettings(Section):
    """LAN discovery and node-to-node HTTP transfers. Owned by issue 6."""

    enabled: bool = True
    interfaces: list[str] = Field(default_factory=list)
    advertise_addresses: list[str] = Field(default_factory=list)
    peer_ttl_s: float = Field(default=120.0, ge=1)  # TTL of the announced records (whole s)
    recheck_s: float = Field(default=30.0, gt=0)
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    max_peers_per_fetch: int = Field(default=4, ge=1)
    signature_skew_s: float = Field(default=60.0, gt=0)
    trusted_peers: list[str] = Field(default_factory=list)
    max_failures: int = Field(default=3, ge=1)
    ban_failure_s: float = Field(default=60.0, ge=0)
    ban_integrity_s: float = Field(default=3600.0, ge=0)


class P2PSettings(Section):
    """libp2p (py-libp2p in its own trio thread). Owned by issue 6."""

    enabled: bool = True
    host: str = "0.0.0.0"  # noqa: S104 (a peer-to-peer node listens on its LAN)
    tcp_port: int = Field(default=4001, ge=0, le=65535)
    ws_port: int = Field(default=4002, ge=0, le=65535)
    announce_addrs: list[str] = Field(default_factory=list)
    bootstrap: list[str] = Field(default_factory=list)
    dht_mode: Literal["server", "client"] = "server"
    max_connections: int = Field(default=48, ge=1)
    max_connections_per_peer: int = Field(default=2, ge=1)
    max_inbound_transfers: int = Field(default=8, ge=1)
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    max_providers: int = Field(default=8, ge=1)
    provide: bool = True
    reprovide_interval_s: float = Field(default=12 * 3600.0, gt=0)
    provide_batch: int = Field(default=64, ge=1)
    provide_concurrency: int = Field(default=4, ge=1)
    provide_tick_s: float = Field(default=5.0, gt=0)
    max_failures: int = Field(default=3, ge=1)
    ban_failure_s: float = Field(default=300.0, ge=0)
    ban_integrity_s: float = Field(default=3600.0, ge=0)


class CoordinatorSettings(Section):
    """Coordinator heartbeat client and drain on stop. Owned by issue 7."""

    url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    heartbeat_interval_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    request_timeout_s: float = Field(default=10.0, gt=0, le=120.0)
    backoff_initial_s: float = Field(default=1.0, gt=0, le=600.0)
    backoff_max_s: float = Field(default=300.0, gt=0, le=3600.0)
    drain_budget_s: float = Field(default=6.0, ge=0, le=600.0)
    drain_streams_s: float = Field(default=2.0, ge=0, le=600.0)
    drain_notice_timeout_s: float = Field(default=1.0, gt=0, le=60.0)


class ApiSettings(Section):
    """The coordinator-facing API under ``/api/v1/``. Owned by issue 7."""

    enabled: bool = True
    require_access_jwt: bool = False
    access_aud: str | None = None
    uplink_bps: int = Field(default=0, ge=0)
    job_concurrency: int = Field(default=2, ge=1, le=64)
    jobs_kept: int = Field(default=1000, ge=10)


class WebRTCSettings(Section):
    """WHEP playback. Owned by issue 8."""

    enabled: bool = True
    max_sessions: int = Field(default=16, ge=0, le=1000)
    connect_timeout_s: float = Field(default=20.0, gt=0, le=300)
    ice_servers: list[str] = Field(default_factory=list)
    turn_username: str | None = None
    turn_api_url: str = "https://rtc.live.cloudflare.com/v1"
    turn_ttl_s: int = Field(default=86400, ge=60, le=172800)
    turn_refresh_margin_s: float = Field(default=300.0, ge=0)
    turn_timeout_s: float = Field(default=5.0, gt=0, le=60)
    transcode: bool = True
    max_height: int = Field(default=1080, ge=1)
    loop_playback: bool = False
    read_ahead_s: float = Field(default=1.0, gt=0, le=10)
    media_threads: int = Field(default=2, ge=1, le=64)
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])


class UiSettings(Section):
    """The operator dashboard. Owned by issue 9."""

    enabled: bool = True
    allow_remote: bool = False
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    sample_interval_s: float = Field(default=10.0, ge=1, le=3600)
    history_points: int = Field(default=360, ge=2, le=100_000)


class AnalyticsSettings(Section):
    """Playback analytics from CMCD and WHEP statistics (issue 23)."""

    enabled: bool = True
    retention_days: int = Field(default=90, ge=1, le=3650)
    startup_timeout_s: float = Field(default=20.0, gt=0, le=600)
    session_idle_s: float = Field(default=60.0, gt=0, le=3600)
    max_sessions: int = Field(default=10_000, ge=1, le=1_000_000)
    max_regions: int = Field(default=20, ge=1, le=300)
    flush_interval_s: float = Field(default=10.0, gt=0, le=3600)
    anomaly_window_s: float = Field(default=300.0, gt=0, le=86400)
    anomaly_min_sessions: int = Field(default=10, ge=1)
    anomaly_z: float = Field(default=3.0, gt=0)
    anomaly_alpha: float = Field(default=0.2, gt=0, le=1)


class Settings(BaseSettings):
    """All of peerd's settings."""

    model_config = SettingsConfigDict(
        env_prefix="PEERD_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    node: NodeSettings = NodeSettings()
    store: StoreSettings = StoreSettings()
    log: LogSettings = LogSettings()
    daemon: DaemonSettings = DaemonSettings()
    http: HttpSettings = HttpSettings()
    media: MediaSettings = MediaSettings()
    r2: R2Settings = R2Settings()
    uplink: UplinkSettings = UplinkSettings()
    swarm: SwarmSettings = SwarmSettings()
    live: LiveSettings = LiveSettings()
    mdns: MdnsSettings = MdnsSettings()
    p2p: P2PSettings = P2PSettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    api: ApiSettings = ApiSettings()
    webrtc: WebRTCSettings = WebRTCSettings()
    ui: UiSettings = UiSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init kwargs, then environment, then the TOML file chosen by :func:`load_settings`."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _CURRENT_TOML is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_CURRENT_TOML))
        return tuple(sources)

    # -- derived paths -------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        """The state directory, with ``~`` and ``$STATE_DIRECTORY`` (systemd) resolved."""
        return self.node.state_dir.expanduser()

    @property
    def catalog_path(self) -> Path:
        """The SQLite catalog."""
        return self.state_dir / "catalog.sqlite3"

    @property
    def blob_dir(self) -> Path:
        """Root of the blob store."""
        return self.state_dir / "blobs"

    @property
    def cache_dir(self) -> Path:
        """Scratch space for work files (transcodes, downloads in progress)."""
        base = self.node.cache_dir or self.state_dir / "cache"
        return base.expanduser()

    @property
    def secrets_path(self) -> Path:
        """Where named secrets are read from when systemd does not provide them."""
        return (self.node.secrets_dir or self.state_dir / "secrets").expanduser()

    @property
    def key_path(self) -> Path:
        """The node's ed25519 private key (PEM, 0600)."""
        return self.state_dir / "node.key"

    def uplink_keys_ignored(self) -> list[str]:
        """The older uplink keys this configuration sets that ``[uplink] budget_mbps`` overrides
        (:data:`UPLINK_FALLBACKS`); none when the budget is 0."""
        if self.uplink.budget_mbps <= 0:
            return []
        ignored = []
        for section, key in UPLINK_FALLBACKS:
            sub = getattr(self, section)
            # Set to its default, a key says nothing (a copy of the example configuration).
            if (
                key in sub.model_fields_set
                and getattr(sub, key) != type(sub).model_fields[key].default
            ):
                ignored.append(f"{section}.{key}")
        return ignored

    def secret(self, name: str) -> str | None:
        """Read a secret by name; ``None`` when it is not provided. Never logged."""
        # Dots allowed (``live-<input>.key``), but no leading dot and no path separator.
        if (
            name.startswith(".")
            or not name.replace("_", "").replace("-", "").replace(".", "").isalnum()
        ):
            raise ValueError(f"bad secret name {name!r}")
        candidates: list[Path] = []
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            candidates.append(Path(cred_dir) / name)
        candidates.append(self.secrets_path / name)
        for path in candidates:
            try:
                value = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConfigError(
                    f"cannot read secret {name!r} from {path}: {exc.strerror}"
                ) from exc
            if value:
                return value
        return None


_CURRENT_TOML: Path | None = None

# The uplink figures from before ``[uplink] budget_mbps``: the budget, when set, is the uplink for
# tiering and for the capacity reported to the coordinator; these count only when it is 0, so a
# configuration written before it keeps its meaning (and a node can tier without admission).
UPLINK_FALLBACKS = (("r2", "uplink_bytes_per_s"), ("api", "uplink_bps"))


# Keys that existed once, with why they went: a config that still sets one is told so by name
# (and not merely that the key is unknown).
REMOVED_KEYS = {
    "http.workers": "HTTP worker processes: two served no faster than one",
}


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        why = REMOVED_KEYS.get(key) if e["type"] == "extra_forbidden" else None
        if why is not None:
            parts.append(f"{key} was removed ({why}); delete it from the configuration")
        else:
            parts.append(f"{key}: {e['msg']}")
    return "; ".join(parts)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (or ``$PEERD_CONFIG``), the environment and ``overrides``.

    Raises :class:`ConfigError` with one message naming every bad key.
    """
    global _CURRENT_TOML
    if path is None and os.environ.get("PEERD_CONFIG"):
        path = Path(os.environ["PEERD_CONFIG"])
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    _CURRENT_TOML = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {_describe(exc)}") from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    finally:
        _CURRENT_TOML = None
    state_env = os.environ.get("STATE_DIRECTORY")
    if state_env and settings.node.state_dir == DEFAULT_STATE_DIR:
        # Under systemd (StateDirectory=) the unit tells us where state lives.
        settings.node.state_dir = Path(state_env.split(":")[0])
    cache_env = os.environ.get("CACHE_DIRECTORY")
    if cache_env and settings.node.cache_dir is None:
        settings.node.cache_dir = Path(cache_env.split(":")[0])
    return settings
