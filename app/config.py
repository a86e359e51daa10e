"""Settings: one object, read once, environment first, then `.env`."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.proxy.routes import parse_extra_routes

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


def _http_url_parts(url: str, example: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, e.g. {example}")
    return parts


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BUDGETGATE_",
        env_file=".env",
        extra="ignore",
        case_sensitive=False,
        # `BUDGETGATE_ADMIN_KEY=` (as in .env.example) means unset, not the empty string: an
        # empty admin key would have opened the admin API to an empty credential.
        env_ignore_empty=True,
    )

    database_url: str = "sqlite+aiosqlite:///./budgetgate.db"
    upstream_url: str = "http://127.0.0.1:4000"
    upstream_api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    # Signs in to the dashboard (/ui) read-only: no page that writes is served to it.
    viewer_key: SecretStr | None = None
    # A dashboard session ends this long after sign-in.
    ui_session_minutes: float = Field(480.0, gt=0)
    key_mode: Literal["managed", "passthrough"] = "managed"
    prices_file: str | None = None
    unpriced_model: Literal["reject", "free"] = "reject"
    trust_upstream_cost: bool = True
    default_max_output_tokens: int = Field(4096, gt=0)
    # Fee-bearing server-side tool calls a request may make when it does not say (SPEC 10).
    default_max_tool_calls: int = Field(8, ge=0)
    # Shrink to fit (SPEC 10): a request whose output bound does not fit is admitted with the
    # largest bound that does, down to min_output_tokens.
    shrink_to_fit: bool = False
    min_output_tokens: int = Field(256, gt=0)
    upstream_timeout_seconds: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    body_timeout_seconds: float = Field(30.0, gt=0)
    # Routes an operator opts in beyond the route table (SPEC 9): "POST /v1/x, GET /v1/y/{id}".
    extra_routes: str | None = None
    reservation_ttl_seconds: float = Field(900.0, gt=0)
    reset_interval_seconds: float = Field(30.0, gt=0)
    alert_webhook_url: str | None = None
    # auto: Slack's or Teams' message format for their incoming-webhook URLs, else the JSON event.
    alert_webhook_format: Literal["auto", "json", "slack", "teams"] = "auto"
    # When set, every alert POST carries x-budgetgate-signature (HMAC-SHA256 of the body).
    alert_secret: SecretStr | None = None
    # /readyz also wants the upstream to accept a connection.
    ready_checks_upstream: bool = False
    # Tell the upstream who calls: x-budgetgate-key-id/-key-alias and x-litellm-tags.
    forward_identity: bool = True
    # OpenTelemetry traces go to this OTLP/HTTP endpoint (e.g. http://otel-collector:4318);
    # unset: no tracing.
    otlp_endpoint: str | None = None
    # /metrics also shows each budget's spend and remaining (one series per budget: opt-in).
    metrics_budget_gauges: bool = False
    # When set, /metrics wants `Authorization: Bearer <token>`.
    metrics_token: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # json: one object a line (the access lines carry their fields); console: for a person.
    log_format: Literal["json", "console", "text"] = "json"
    auto_migrate: bool = False
    # SQLite commit durability (WAL mode either way). normal: a committed transaction survives a
    # gateway crash (kill -9), and the file never corrupts, but a power loss or OS crash can roll
    # back the last transactions. full: also survives power loss; costs an fsync per commit.
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    db_pool_size: int = Field(20, gt=0)
    upstream_max_connections: int = Field(512, gt=0)

    @field_validator("log_level", "log_format", "alert_webhook_format", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator(
        "admin_key",
        "viewer_key",
        "upstream_api_key",
        "prices_file",
        "alert_webhook_url",
        "alert_secret",
        "metrics_token",
        "otlp_endpoint",
    )
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        """Blank is unset however the value arrives (environment, .env, code)."""
        secret = v.get_secret_value() if isinstance(v, SecretStr) else v
        return None if isinstance(secret, str) and not secret.strip() else v

    @field_validator("viewer_key")
    @classmethod
    def _viewer_is_not_admin(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """The read-only key must not open the admin API too."""
        admin = info.data.get("admin_key")
        if v is not None and admin is not None and v.get_secret_value() == admin.get_secret_value():
            raise ValueError("must differ from BUDGETGATE_ADMIN_KEY (the viewer key is read-only)")
        return v

    @field_validator("upstream_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = _http_url_parts(v, "http://127.0.0.1:4000")
        if "@" in parts.netloc:
            # A credential in the URL would ride along with every request, whatever the key
            # mode; the upstream credential is BUDGETGATE_UPSTREAM_API_KEY.
            raise ValueError(
                "must not contain user info (user:password@): set the upstream credential in "
                "BUDGETGATE_UPSTREAM_API_KEY"
            )
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return v.rstrip("/")

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        """Refused at start, not by every delivery attempt for hours."""
        if v is not None:
            _http_url_parts(v, "https://hooks.slack.com/services/...")
        return v

    @field_validator("extra_routes")
    @classmethod
    def _routes(cls, v: str | None) -> str | None:
        parse_extra_routes(v)  # refused at start, with the entry named, not on a request
        return v

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, v: str) -> str:
        """`sqlite:///…` and `postgresql://…`, as other tools write them, mean the async drivers
        budgetgate runs on; any other scheme is refused here, not deep in a migration."""
        scheme, sep, rest = v.partition("://")
        driver = _ASYNC_DRIVERS.get(scheme.lower()) if sep else None
        if driver is None:
            raise ValueError(
                f"unsupported database URL {v.split('@')[-1]!r}: use sqlite+aiosqlite:///PATH "
                "or postgresql+asyncpg://USER:PASSWORD@HOST/DB"
            )
        return f"{driver}://{rest}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
