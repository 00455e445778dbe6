"""Tests for reading CALLGATE_* settings strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.settings import load
from tenancy.errors import ConfigError

KEY = "k" * 40


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"CALLGATE_DATA_DIR": str(tmp_path), **extra}


def test_load_uses_defaults_and_generates_keys_once(tmp_path: Path) -> None:
    """Missing keys are generated into the data dir (0600) and reused later."""
    first = load(_env(tmp_path))
    assert (first.host, first.port) == ("127.0.0.1", 8080)
    assert first.public_url == "http://127.0.0.1:8080"
    assert first.vapi_api_url == "https://api.vapi.ai"
    assert first.verify_signatures is True
    assert len(first.generated_key_files) == 2
    for path in first.generated_key_files:
        assert path.stat().st_mode & 0o777 == 0o600
    second = load(_env(tmp_path))
    assert second.generated_key_files == ()
    assert (second.operator_key, second.secret_key) == (
        first.operator_key,
        first.secret_key,
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CALLGATE_PORT", "eighty", "CALLGATE_PORT must be an integer"),
        ("CALLGATE_PORT", "70000", "CALLGATE_PORT must be between"),
        ("CALLGATE_PUBLIC_URL", "ftp://x", "CALLGATE_PUBLIC_URL must be an http"),
        ("CALLGATE_VERIFY_SIGNATURES", "maybe", "CALLGATE_VERIFY_SIGNATURES must"),
        ("CALLGATE_OPERATOR_KEY", "short", "CALLGATE_OPERATOR_KEY must be at least"),
        ("CALLGATE_REDIS_URL", "http://x", "CALLGATE_REDIS_URL must be"),
        ("CALLGATE_TWILIO_ACCOUNT_SID", "AC12", "CALLGATE_TWILIO_ACCOUNT_SID must"),
        ("CALLGATE_LOG_LEVEL", "LOUD", "CALLGATE_LOG_LEVEL must be one of"),
        # The default lease (10 s) must outlast two report ticks.
        ("CALLGATE_FLUSH_INTERVAL_MS", "6000", "at least twice"),
        ("CALLGATE_WEBHOOK_RETRY_MAX_MS", "1000", "must not be below"),
    ],
)
def test_load_names_the_bad_variable(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    """A malformed value stops start-up with an error naming the variable."""
    with pytest.raises(ConfigError, match=message):
        load(_env(tmp_path, **{name: value}))


def test_load_wants_twilio_sid_and_token_together(tmp_path: Path) -> None:
    """An account sid without its auth token is refused."""
    with pytest.raises(ConfigError, match="must be set together"):
        load(_env(tmp_path, CALLGATE_TWILIO_ACCOUNT_SID="AC" + "0" * 32))


def test_stream_base_url_moves_the_scheme_to_websocket(tmp_path: Path) -> None:
    """https becomes wss and http becomes ws."""
    env = _env(tmp_path, CALLGATE_OPERATOR_KEY=KEY, CALLGATE_SECRET_KEY=KEY)
    secure = load({**env, "CALLGATE_PUBLIC_URL": "https://cg.example.com/"})
    assert secure.stream_base_url == "wss://cg.example.com"
    assert load(env).stream_base_url == "ws://127.0.0.1:8080"
