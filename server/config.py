"""Configuration from ``THREADLINE_*`` environment variables, validated once at start-up."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError


class ModelPrice(BaseModel):
    """USD per 1,000 tokens for one model."""

    prompt_per_1k: float = Field(ge=0)
    completion_per_1k: float = Field(ge=0)


# Prices for well-known models (USD per 1k tokens). A model missing here is charged
# DEFAULT_PRICE, which is deliberately conservative: unknown never means free.
BUILTIN_PRICES: dict[str, ModelPrice] = {
    "gpt-4o": ModelPrice(prompt_per_1k=0.0025, completion_per_1k=0.01),
    "gpt-4o-mini": ModelPrice(prompt_per_1k=0.00015, completion_per_1k=0.0006),
    "gpt-4.1": ModelPrice(prompt_per_1k=0.002, completion_per_1k=0.008),
    "gpt-4.1-mini": ModelPrice(prompt_per_1k=0.0004, completion_per_1k=0.0016),
    "gpt-3.5-turbo": ModelPrice(prompt_per_1k=0.0005, completion_per_1k=0.0015),
    "threadline-offline": ModelPrice(prompt_per_1k=0.0, completion_per_1k=0.0),
}
DEFAULT_PRICE = ModelPrice(prompt_per_1k=0.01, completion_per_1k=0.03)


_NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def default_node_id() -> str:
    """``<host name>-<pid>``, reduced to the characters a node id may hold."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:48] or "node"
    return f"{host}-{os.getpid()}"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the server. Secrets are ``SecretStr`` so they never print."""

    model_config = SettingsConfigDict(env_prefix="THREADLINE_", extra="ignore")
    _signing_key: str | None = PrivateAttr(default=None)

    env: Literal["development", "production", "test"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = None

    database_url: SecretStr | None = None
    data_dir: Path = Path("./.threadline")
    db_pool_min: int = Field(default=2, ge=1, le=100)
    db_pool_max: int = Field(default=10, ge=1, le=200)
    db_statement_timeout_ms: int = Field(default=5000, ge=100, le=600_000)
    db_connect_timeout_s: float = Field(default=5.0, gt=0, le=120)

    llm_base_url: str | None = None
    llm_api_key: SecretStr | None = None
    llm_model: str = "gpt-4o-mini"
    llm_prices: Annotated[dict[str, ModelPrice], NoDecode] = Field(default_factory=dict)
    llm_connect_timeout_s: float = Field(default=5.0, gt=0)
    llm_read_timeout_s: float = Field(default=30.0, gt=0)
    llm_total_timeout_s: float = Field(default=120.0, gt=0)
    llm_max_retries: int = Field(default=3, ge=0, le=10)
    llm_context_tokens: int = Field(default=8000, ge=256)
    llm_max_reply_tokens: int = Field(default=1024, ge=1)
    llm_system_prompt: str = "You are a helpful assistant."
    llm_circuit_failures: int = Field(default=5, ge=1)
    llm_circuit_reset_s: float = Field(default=30.0, gt=0)
    content_filter: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_message_chars: int = Field(default=32_000, ge=1)
    summary_threshold_tokens: int = Field(default=4000, ge=100)

    jwt_secret: SecretStr | None = None
    access_token_ttl_s: int = Field(default=86_400, ge=60)
    # A revoked token is refused by every node within this many seconds (server/authcache.py);
    # 0 checks every request in the database.
    auth_revocation_bound_s: float = Field(default=1.0, ge=0, le=60)
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    single_user: bool = False
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Per-account login throttle (server/login_throttle.py): attempts beyond the free ones wait
    # base, 2 base, 4 base... at most max (the schema caps it at an hour); forgotten after a
    # quiet period.
    login_free_attempts: int = Field(default=5, ge=1, le=1000)
    login_delay_base_s: float = Field(default=1.0, gt=0, le=3600)
    login_delay_max_s: float = Field(default=300.0, gt=0, le=3600)
    login_forget_after_s: float = Field(default=3600.0, gt=0)
    # Argon2id cost (RFC 9106 low-memory profile by default); tests use cheap values.
    argon2_time_cost: int = Field(default=3, ge=1, le=20)
    argon2_memory_kib: int = Field(default=65_536, ge=8, le=4 * 1024 * 1024)
    argon2_parallelism: int = Field(default=4, ge=1, le=64)

    rate_limit_per_s: float = Field(default=20.0, gt=0)
    rate_limit_burst: int = Field(default=60, ge=1)
    ip_rate_limit_per_s: float = Field(default=50.0, gt=0)
    ip_rate_limit_burst: int = Field(default=200, ge=1)
    rate_limit_max_buckets: int = Field(default=100_000, ge=100)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)

    ws_max_message_bytes: int = Field(default=64 * 1024, ge=1024)
    ws_outbound_queue: int = Field(default=256, ge=1)
    # Bytes queued plus bytes handed to the socket and not yet taken by the kernel (contract).
    ws_outbound_queue_bytes: int = Field(default=1024 * 1024, ge=1024)
    ws_inbound_queue: int = Field(default=64, ge=1)
    heartbeat_interval_s: float = Field(default=20.0, gt=0)
    heartbeat_timeout_s: float = Field(default=10.0, gt=0)
    ws_abuse_strikes: int = Field(default=20, ge=1)
    thread_mailbox: int = Field(default=1024, ge=1)
    thread_idle_timeout_s: float = Field(default=60.0, gt=0)
    graceful_timeout_s: float = Field(default=10.0, gt=0)
    # An HTTP connection with no request in flight (idle keep-alive, or request headers still
    # incomplete: slowloris) is closed after this long.
    http_keep_alive_timeout_s: float = Field(default=30.0, gt=0)
    # Python's cyclic garbage collector, first threshold (CPython's default: 700). A full
    # collection traverses every live object (about 170 per open WebSocket): at 10,000
    # connections that is a stall of a second or more; a higher threshold makes them rare
    # while connections are being opened (docs/performance.md).
    gc_threshold: int = Field(default=10_000, ge=100)
    # Once started, move start-up's objects (modules, classes, the app: they live as long as the
    # process) out of the collector's sight (``gc.freeze``): a full collection then traverses
    # only what came after, the connections and requests (docs/performance.md, "Fan-out").
    gc_freeze: bool = True

    # Several nodes on one PostgreSQL (docs/operations.md, "Scaling out").
    node_id: str = Field(default_factory=default_node_id)
    node_timeout_s: float = Field(default=15.0, ge=0.5, le=3600)

    # The built web client (server/webdist, from web/ by `make setup`); another directory here.
    web_dir: Path | None = None

    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("allowed_origins", "trusted_proxies", "content_filter", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if not _NODE_ID_RE.match(value):
            raise ValueError("must be 1-64 characters: letters, digits, '.', '_' or '-'")
        return value

    @field_validator("llm_prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be JSON (model -> prices): {exc.msg}") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _pg_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.env == "production" and self.jwt_secret is None:
            raise ValueError("THREADLINE_JWT_SECRET is required when THREADLINE_ENV=production")
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("THREADLINE_DB_POOL_MIN must not exceed THREADLINE_DB_POOL_MAX")
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:
            raise ValueError(
                "THREADLINE_ARGON2_MEMORY_KIB must be at least 8 x THREADLINE_ARGON2_PARALLELISM"
            )
        return self

    # -- derived values -------------------------------------------------------------------

    @property
    def origins(self) -> list[str]:
        """Allowed origins; by default the server's own."""
        if self.allowed_origins:
            return self.allowed_origins
        if self.public_url:
            return [self.public_url.rstrip("/")]
        return [f"http://{self.host}:{self.port}", f"http://localhost:{self.port}"]

    @property
    def node_heartbeat_s(self) -> float:
        """How often a node refreshes its row (and sweeps for dead nodes' replies)."""
        return self.node_timeout_s / 3

    def price_for(self, model: str) -> ModelPrice:
        """The configured price of ``model``, else the built-in one, else a conservative default."""
        return self.llm_prices.get(model) or BUILTIN_PRICES.get(model) or DEFAULT_PRICE

    def signing_key(self) -> str:
        """The JWT signing key: configured, or generated once into the data dir (mode 0600).

        Read once per ``Settings`` (every request uses it; no file read per request).
        """
        if self._signing_key is not None:
            return self._signing_key
        if self.jwt_secret is not None:
            key = self.jwt_secret.get_secret_value()
        else:
            path = self.data_dir / "jwt_secret"
            if not path.exists():
                # Several nodes may start at once on one data dir: write a private file whole,
                # then link it into place: the link fails for all but one; no reader sees half a
                # key.
                self.data_dir.mkdir(parents=True, exist_ok=True)
                draft = self.data_dir / f".jwt_secret.{os.getpid()}.{secrets.token_hex(4)}"
                fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(48))
                try:
                    os.link(draft, path)
                except FileExistsError:
                    pass  # another node's key won; use it
                finally:
                    draft.unlink()
            key = path.read_text().strip()
        self._signing_key = key
        return key


class ConfigError(Exception):
    """Start-up configuration is invalid; ``problems`` holds one line per bad value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment. Raises ConfigError naming each bad variable.

    The messages never echo the value given, so a secret in a malformed variable is not printed.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = "_".join(str(p) for p in err["loc"]).upper()
            name = f"THREADLINE_{loc}" if loc else "configuration"
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError(problems) from None
    except SettingsError as exc:  # a variable that could not even be parsed
        raise ConfigError([str(exc)]) from None
