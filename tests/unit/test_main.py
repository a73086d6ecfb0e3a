"""What main.py derives from the settings: start-up warnings and the hypercorn configuration."""

from __future__ import annotations

import logging

from interpreter.main import hypercorn_config, startup_warnings
from interpreter.settings import load_settings


def warnings_for(**env: str) -> list[str]:
    return startup_warnings(load_settings(env, env_file=None))


def test_default_key_on_a_public_bind_is_loud() -> None:
    (warning, short) = warnings_for(API_HOST="0.0.0.0")
    assert "default API key" in warning
    assert "shorter than 16" in short
    assert not any("default API key" in w for w in warnings_for(API_HOST="127.0.0.1"))
    assert warnings_for(API_HOST="0.0.0.0", API_KEY="a-long-random-key-0123456789") == []


def test_other_risky_settings_warn() -> None:
    assert any("AUTH_ENABLED=false" in w for w in warnings_for(API_HOST="::", AUTH_ENABLED="false"))
    assert any(
        "ENABLE_NETWORK_ISOLATION" in w for w in warnings_for(API_HOST="127.0.0.1", ENABLE_NETWORK_ISOLATION="false")
    )
    assert any("API_RELOAD" in w for w in warnings_for(API_HOST="127.0.0.1", API_RELOAD="true"))


def test_hypercorn_config_follows_the_settings() -> None:
    config = hypercorn_config(
        load_settings(
            {"API_HOST": "::1", "PORT": "8123", "SHUTDOWN_GRACE_SECONDS": "7", "MAX_REQUEST_JSON_MB": "2"},
            env_file=None,
        )
    )
    assert config.bind == ["[::1]:8123"]
    assert config.graceful_timeout == 7
    assert config.websocket_max_message_size == 2 * 1024 * 1024
    assert config.accesslog is None
    assert config.certfile is None
    logged = hypercorn_config(load_settings({"ENABLE_ACCESS_LOGS": "true"}, env_file=None))
    assert isinstance(logged.accesslog, logging.Logger)
    assert "%(q)s" not in logged.access_log_format  # never the query string
    assert hypercorn_config(load_settings({}, env_file=None)).bind == ["0.0.0.0:8000"]
