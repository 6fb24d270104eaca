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

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from peerd.errors import ConfigError

DEFAULT_STATE_DIR = Path("~/.local/share/peerd")


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


class MediaSettings(Section):
    """Packaging. Owned by issue 3."""


class R2Settings(Section):
    """Cloudflare R2 replication and tiering. Owned by issue 5."""


class MdnsSettings(Section):
    """LAN discovery. Owned by issue 6."""


class P2PSettings(Section):
    """libp2p. Owned by issue 6."""


class CoordinatorSettings(Section):
    """Coordinator heartbeat client. Owned by issue 7."""


class ApiSettings(Section):
    """The coordinator-facing API. Owned by issue 7."""


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
    mdns: MdnsSettings = MdnsSettings()
    p2p: P2PSettings = P2PSettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    api: ApiSettings = ApiSettings()
    webrtc: WebRTCSettings = WebRTCSettings()
    ui: UiSettings = UiSettings()

    _toml_path: Path | None = None

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

    def secret(self, name: str) -> str | None:
        """Read a secret by name; ``None`` when it is not provided. Never logged."""
        if not name.replace("_", "").replace("-", "").isalnum():
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


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
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
