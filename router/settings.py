"""One frozen settings object, read once at start-up from ``CALLGATE_*`` variables.

Every variable, its default and its unit is listed in the README. A malformed
value stops start-up with a :class:`ConfigError` that names the variable.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from metering.plans import RateCard
from tenancy.errors import ConfigError
from tenancy.keyspace import ACCOUNT_SID
from tenancy.logs import router_logger

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}
_MIN_SECRET_CHARS = 32


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything Callgate is configured with. Build it with :func:`load`."""

    host: str
    port: int
    redis_url: str | None
    redis_cluster: bool
    data_dir: Path
    public_url: str
    operator_key: str
    secret_key: str
    twilio_account_sid: str | None
    twilio_auth_token: str | None
    twilio_api_url: str
    vapi_api_url: str
    retell_api_url: str
    verify_signatures: bool
    log_level: str
    stream_token_ttl_secs: int
    flush_interval_ms: int
    upstream_timeout_secs: float
    store_timeout_secs: float
    grant_ms: int
    lease_ms: int
    rates: RateCard
    reconcile_after_secs: int
    # How often a live Retell call is looked up through Twilio's REST API, in
    # case every report of its end was lost.
    sip_check_secs: int = 60
    # Offboarding export archives are deleted this many days after they were
    # written; 0 keeps them until the operator deletes them.
    export_retention_days: int = 30
    # Budget webhooks: the first retry waits webhook_retry_secs, each next one
    # twice as long, up to webhook_retry_max_secs; one attempt may take
    # webhook_timeout_secs.
    webhook_retry_secs: float = 5.0
    webhook_retry_max_secs: float = 3600.0
    webhook_timeout_secs: float = 10.0
    generated_key_files: tuple[Path, ...] = ()

    @property
    def stream_base_url(self) -> str:
        """``public_url`` with its scheme moved to WebSocket (https to wss)."""
        scheme, _, rest = self.public_url.partition("://")
        return ("wss" if scheme == "https" else "ws") + "://" + rest


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every ``CALLGATE_*`` variable; generate missing keys.

    Without ``CALLGATE_OPERATOR_KEY`` or ``CALLGATE_SECRET_KEY``, a random one is
    generated once into the data directory (mode 0600) and reused afterwards.
    """
    env = os.environ if environ is None else environ
    host = env.get("CALLGATE_HOST", "127.0.0.1")
    port = _integer(env, "CALLGATE_PORT", 8080, 1, 65535)
    data_dir = Path(env.get("CALLGATE_DATA_DIR", ".data")).resolve()
    public_url = _url(env, "CALLGATE_PUBLIC_URL", f"http://{host}:{port}")

    generated: list[Path] = []
    operator_key = _key(env, "CALLGATE_OPERATOR_KEY", data_dir, generated)
    secret_key = _key(env, "CALLGATE_SECRET_KEY", data_dir, generated)

    account_sid = env.get("CALLGATE_TWILIO_ACCOUNT_SID") or None
    if account_sid is not None and not ACCOUNT_SID.fullmatch(account_sid):
        raise ConfigError(
            "CALLGATE_TWILIO_ACCOUNT_SID must be 'AC' followed by 32 hex digits"
        )
    auth_token = env.get("CALLGATE_TWILIO_AUTH_TOKEN") or None
    if (account_sid is None) != (auth_token is None):
        raise ConfigError(
            "CALLGATE_TWILIO_ACCOUNT_SID and CALLGATE_TWILIO_AUTH_TOKEN "
            "must be set together"
        )

    redis_url = env.get("CALLGATE_REDIS_URL") or None
    if redis_url is not None and urlsplit(redis_url).scheme not in {
        "redis",
        "rediss",
        "unix",
        "valkey",
    }:
        raise ConfigError(
            "CALLGATE_REDIS_URL must be a redis://, rediss:// or unix:// URL"
        )

    redis_cluster = _boolean(env, "CALLGATE_REDIS_CLUSTER", False)
    if redis_cluster and (redis_url is None or redis_url.startswith("unix:")):
        raise ConfigError(
            "CALLGATE_REDIS_CLUSTER needs CALLGATE_REDIS_URL to name a cluster node "
            "(redis:// or rediss://)"
        )

    # A lease must outlast two report ticks, or a healthy call's lease lapses
    # between its reports and a sweeper hangs it up as owner_lost.
    tick_ms = _integer(env, "CALLGATE_FLUSH_INTERVAL_MS", 1000, 100, 10000)
    lease_ms = _integer(env, "CALLGATE_LEASE_MS", 10_000, 2_000, 120_000)
    if lease_ms < 2 * tick_ms:
        raise ConfigError(
            "CALLGATE_LEASE_MS must be at least twice CALLGATE_FLUSH_INTERVAL_MS, "
            f"got {lease_ms} and {tick_ms}"
        )
    retry_ms = _integer(env, "CALLGATE_WEBHOOK_RETRY_MS", 5_000, 10, 3_600_000)
    retry_max_ms = _integer(
        env, "CALLGATE_WEBHOOK_RETRY_MAX_MS", 3_600_000, 10, 86_400_000
    )
    if retry_max_ms < retry_ms:
        raise ConfigError(
            "CALLGATE_WEBHOOK_RETRY_MAX_MS must not be below CALLGATE_WEBHOOK_RETRY_MS"
        )

    log_level = env.get("CALLGATE_LOG_LEVEL", "INFO").upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"CALLGATE_LOG_LEVEL must be one of {sorted(_LOG_LEVELS)}")

    return Settings(
        host=host,
        port=port,
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        data_dir=data_dir,
        public_url=public_url,
        operator_key=operator_key,
        secret_key=secret_key,
        twilio_account_sid=account_sid,
        twilio_auth_token=auth_token,
        twilio_api_url=_url(env, "CALLGATE_TWILIO_API_URL", "https://api.twilio.com"),
        vapi_api_url=_url(env, "CALLGATE_VAPI_API_URL", "https://api.vapi.ai"),
        retell_api_url=_url(env, "CALLGATE_RETELL_API_URL", "https://api.retellai.com"),
        verify_signatures=_boolean(env, "CALLGATE_VERIFY_SIGNATURES", True),
        log_level=log_level,
        stream_token_ttl_secs=_integer(
            env, "CALLGATE_STREAM_TOKEN_TTL_SECS", 30, 1, 600
        ),
        flush_interval_ms=_integer(env, "CALLGATE_FLUSH_INTERVAL_MS", 1000, 100, 10000),
        upstream_timeout_secs=_integer(
            env, "CALLGATE_UPSTREAM_TIMEOUT_MS", 3000, 100, 60000
        )
        / 1000,
        store_timeout_secs=_integer(env, "CALLGATE_STORE_TIMEOUT_MS", 1000, 50, 30000)
        / 1000,
        grant_ms=_integer(env, "CALLGATE_GRANT_MS", 30_000, 1_000, 600_000),
        lease_ms=_integer(env, "CALLGATE_LEASE_MS", 10_000, 2_000, 120_000),
        reconcile_after_secs=_integer(
            env, "CALLGATE_RECONCILE_AFTER_SECS", 300, 1, 86_400
        ),
        sip_check_secs=_integer(env, "CALLGATE_SIP_CHECK_SECS", 60, 1, 3_600),
        rates=RateCard(
            twilio_micros_per_minute=_integer(
                env, "CALLGATE_RATE_TWILIO_MICROS_PER_MIN", 8_500, 0, 10**9
            ),
            twilio_sip_micros_per_minute=_integer(
                env, "CALLGATE_RATE_TWILIO_SIP_MICROS_PER_MIN", 4_000, 0, 10**9
            ),
            vapi_micros_per_minute=_integer(
                env, "CALLGATE_RATE_VAPI_MICROS_PER_MIN", 50_000, 0, 10**9
            ),
            retell_micros_per_minute=_integer(
                env, "CALLGATE_RATE_RETELL_MICROS_PER_MIN", 70_000, 0, 10**9
            ),
        ),
        export_retention_days=_integer(
            env, "CALLGATE_EXPORT_RETENTION_DAYS", 30, 0, 3650
        ),
        webhook_retry_secs=_integer(
            env, "CALLGATE_WEBHOOK_RETRY_MS", 5_000, 10, 3_600_000
        )
        / 1000,
        webhook_retry_max_secs=_integer(
            env, "CALLGATE_WEBHOOK_RETRY_MAX_MS", 3_600_000, 10, 86_400_000
        )
        / 1000,
        webhook_timeout_secs=_integer(
            env, "CALLGATE_WEBHOOK_TIMEOUT_MS", 10_000, 100, 60_000
        )
        / 1000,
        generated_key_files=tuple(generated),
    )


def _integer(
    env: Mapping[str, str], name: str, default: int, low: int, high: int
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not carry a query or fragment")
    return raw.rstrip("/")


def _key(
    env: Mapping[str, str], name: str, data_dir: Path, generated: list[Path]
) -> str:
    """The key from the environment, or one generated once into the data dir."""
    value = env.get(name)
    if value:
        if len(value) < _MIN_SECRET_CHARS:
            raise ConfigError(f"{name} must be at least {_MIN_SECRET_CHARS} characters")
        return value
    path = data_dir / name.removeprefix("CALLGATE_").lower()
    try:
        if path.exists():
            stored = path.read_text(encoding="ascii").strip()
            if len(stored) < _MIN_SECRET_CHARS:
                raise ConfigError(
                    f"{path} is shorter than {_MIN_SECRET_CHARS} characters"
                )
            return stored
        data_dir.mkdir(parents=True, exist_ok=True)
        stored = secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(stored + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot read or write {name} at {path}: {exc}") from exc
    generated.append(path)
    router_logger.info("generated %s into %s", name, path)
    return stored
