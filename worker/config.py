"""Settings: environment variables prefixed CONSOLIDATOR_, optionally a TOML file.

The TOML file is named by CONSOLIDATOR_CONFIG_FILE; environment variables win over it.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from redis.connection import parse_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from worker.timespec import parse_duration


class LayoutName(StrEnum):
    LIST = "list"
    GEMINI = "gemini"
    LANGCHAIN = "langchain"
    ADK = "adk"
    LLAMAINDEX = "llamaindex"


class SummarizerName(StrEnum):
    AUTO = "auto"
    GEMINI = "gemini"
    EXTRACTIVE = "extractive"


class LogFormat(StrEnum):
    AUTO = "auto"  # JSON unless stderr is a terminal
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @classmethod
    def _missing_(cls, value: object) -> LogLevel | None:
        return cls.__members__.get(str(value).upper())  # INFO as well as info


class OnSummaryFailure(StrEnum):
    KEEP = "keep"  # leave the hot state as it was (the archive still has everything)
    MARKER = "marker"  # replace the folded turns by "N earlier turns archived"


DEFAULT_KEY_PATTERNS: dict[LayoutName, str] = {
    LayoutName.LIST: "conversation:{id}:history",
    LayoutName.GEMINI: "chat:{id}",
    LayoutName.LANGCHAIN: "message_store:{id}",
    LayoutName.ADK: "adk:session:{app}:{user}:{id}",
    LayoutName.LLAMAINDEX: "{id}",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONSOLIDATOR_",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        allow_inf_nan=False,  # an infinite pace or lease would fail every session at run time
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    # Per command (Redis) and per statement or connection attempt (PostgreSQL): behind a
    # network partition a call fails after this long instead of hanging, holding its lease.
    redis_timeout_s: float = Field(default=10.0, gt=0)
    database_timeout_s: float = Field(default=30.0, gt=0)

    layout: LayoutName = LayoutName.LIST
    key_pattern: str | None = None  # None: the layout's default
    newest_first: bool = False  # the list layout with LPUSH instead of RPUSH
    metadata_pattern: str | None = None  # e.g. "session:{id}", seed 002's HASH beside the history
    # The agent's own per-session lock (seed 003's "chat:lock:{id}", SET NX with a token): when
    # set, a rewrite takes it for the instant of the swap, and gives up while the agent holds it.
    agent_lock_pattern: str | None = None

    idle_after_s: float = Field(default=1800.0, ge=0)
    expiry_margin_s: float = Field(default=600.0, ge=0)
    keep_recent: int = Field(default=10, ge=0)
    max_hot_tokens: int = Field(default=8000, ge=1)
    scan_interval_s: float = Field(default=30.0, gt=0)
    scan_count: int = Field(default=2000, ge=10)  # SCAN COUNT: fewer, cheaper full scans
    concurrency: int = Field(default=16, ge=1, le=4096)
    # A ceiling on sessions started per second, for a daemon that shares its machine with the
    # agents: at full speed archiving costs them latency (see the README's benchmark). Sessions
    # about to expire are never held back by it. None: no ceiling.
    max_sessions_per_s: float | None = Field(default=None, gt=0)
    # Percent: while some task waits for a CPU more of the time than this (Linux's PSI, from
    # cpu_pressure_file), the daemon slows down, and it speeds up again once below; for a
    # daemon on the agents' cores that should take only what they leave. None: off.
    max_cpu_pressure: float | None = Field(default=None, gt=0, le=100)
    # The machine's figures; a container may follow its own cgroup's cpu.pressure instead.
    cpu_pressure_file: Path = Path("/proc/pressure/cpu")
    lease_ttl_s: float = Field(default=60.0, ge=0.1, le=86_400)  # Redis needs whole ms
    drain_grace_s: float = Field(default=20.0, ge=0)
    max_value_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    summarizer: SummarizerName = SummarizerName.AUTO
    summary_max_chars: int = Field(default=1200, ge=100)
    on_summary_failure: OnSummaryFailure = OnSummaryFailure.KEEP
    gemini_model: str = "gemini-3.5-flash"
    gemini_api_key: SecretStr | None = Field(default=None, validation_alias="GEMINI_API_KEY")
    gemini_timeout_s: float = Field(default=30.0, gt=0)
    gemini_max_attempts: int = Field(default=4, ge=1)
    gemini_backoff_max_s: float = Field(default=20.0, gt=0)
    gemini_requests_per_minute: int = Field(default=600, ge=1)
    gemini_tokens_per_minute: int = Field(default=2_000_000, ge=1)
    gemini_breaker_failures: int = Field(default=5, ge=1)  # consecutive failures to open
    gemini_breaker_reset_s: float = Field(default=30.0, gt=0)
    gemini_max_output_tokens: int = Field(default=512, ge=16)
    gemini_usd_per_million_in: float = Field(default=0.30, ge=0)
    gemini_usd_per_million_out: float = Field(default=2.50, ge=0)
    summary_fallback: bool = False  # extractive summary when the model fails
    # Worker processes for the offline summarizer (0: on the event loop). They take the
    # summarizer's CPU to other cores: a backlog went a fifth faster with 2 on 2 cores (as many
    # sessions in flight), but the agents on those cores wait longer for a CPU, so the default
    # leaves them off.
    summary_processes: int = Field(default=0, ge=0, le=64)
    fold_max_tokens: int = Field(default=24_000, ge=100)  # most a single fold sends to the model

    # Archive retention (e.g. "90d"): the daemon prunes what is older, at most once an hour.
    retention: timedelta | None = None

    metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    log_format: LogFormat = LogFormat.AUTO
    log_level: LogLevel = LogLevel.INFO

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        # redis-py's own parser: its ValueError names what is wrong (scheme, port), not the URL.
        parse_url(value)  # type: ignore[no-untyped-call]
        return value

    @field_validator("database_url")
    @classmethod
    def _asyncpg_driver(cls, value: str) -> str:
        # Operators paste plain libpq URLs; SQLAlchemy needs the driver named.
        for plain in ("postgresql://", "postgres://"):
            if value.startswith(plain):
                value = "postgresql+asyncpg://" + value[len(plain) :]
        try:
            url = make_url(value)
            port = url.port  # parsed lazily: "host:notaport" fails here
        except (ArgumentError, ValueError) as exc:
            raise ValueError("not a PostgreSQL URL (postgresql://user@host:port/database)") from exc
        if url.drivername != "postgresql+asyncpg":
            raise ValueError(f"needs a PostgreSQL URL (postgresql://...), not {url.drivername}://")
        if port is not None and not 0 < port < 65_536:
            raise ValueError(f"port {port} is out of range")
        return value

    @field_validator("metadata_pattern", "agent_lock_pattern")
    @classmethod
    def _names_the_session(cls, value: str | None) -> str | None:
        # Without {id}, every session would share one metadata hash, or one lock.
        if value is not None and value.count("{id}") != 1:
            raise ValueError("must contain {id} exactly once")
        return value

    @field_validator("max_sessions_per_s", "max_cpu_pressure", mode="before")
    @classmethod
    def _no_limit_when_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("retention", mode="before")
    @classmethod
    def _retention_duration(cls, value: object) -> object:
        # "90d", "12h" as operators write them; ISO 8601 ("P90D") and seconds work too.
        if isinstance(value, str) and not value.strip():
            return None  # CONSOLIDATOR_RETENTION= (empty): keep everything
        if isinstance(value, str) and value.strip()[0].isdigit():
            try:
                return parse_duration(value)
            except (ValueError, OverflowError):
                with contextlib.suppress(ValueError, OverflowError):
                    return timedelta(seconds=float(value))
        return value

    @field_validator("retention")
    @classmethod
    def _retention_positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("retention must be a positive duration")
        return value

    @property
    def pattern(self) -> str:
        return self.key_pattern or DEFAULT_KEY_PATTERNS[self.layout]

    @property
    def model_api_key(self) -> str | None:
        if self.gemini_api_key is not None:
            return self.gemini_api_key.get_secret_value()
        return os.environ.get("GOOGLE_API_KEY") or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = os.environ.get("CONSOLIDATOR_CONFIG_FILE")
        if toml_file:
            _check_config_file(Path(toml_file), set(settings_cls.model_fields))
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_file)))
        return tuple(sources)


class ConfigFileError(ValueError):
    """The file CONSOLIDATOR_CONFIG_FILE names is missing, not TOML, or has unknown settings."""


def _check_config_file(path: Path, known: set[str]) -> None:
    # The file is read to be used, so a typo in it must not silently leave a default in force.
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"config file {path}: {exc}") from exc
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigFileError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
