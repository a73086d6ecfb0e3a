"""Settings: every variable is read under its guide name, validated, redacted, and remembered as given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from interpreter.errors import SettingsError
from interpreter.settings import SECRET_FIELDS, Settings, load_settings, variable_names
from tests.conftest import cli_env

# The configuration guide's variables, copied here so that a renamed field fails this test.
GUIDE_VARIABLES = [
    "PORT",
    "API_HOST",
    "API_DEBUG",
    "API_RELOAD",
    "ENABLE_HTTPS",
    "SSL_CERTS_PATH",
    "SSL_CERT_FILE",
    "SSL_KEY_FILE",
    "SSL_CA_CERTS",
    "API_KEY",
    "API_KEYS",
    "MASTER_API_KEY",
    "AUTH_ENABLED",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "REDIS_URL",
    "REDIS_MAX_CONNECTIONS",
    "REDIS_SOCKET_TIMEOUT",
    "REDIS_SOCKET_CONNECT_TIMEOUT",
    "S3_ENDPOINT",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "S3_SECURE",
    "S3_BUCKET",
    "S3_REGION",
    "NSJAIL_BINARY",
    "SANDBOX_BASE_DIR",
    "SANDBOX_TMPFS_SIZE_MB",
    "SANDBOX_TTL_MINUTES",
    "SANDBOX_CLEANUP_INTERVAL_MINUTES",
    "MAX_EXECUTION_TIME",
    "MAX_MEMORY_MB",
    "MAX_FILE_SIZE_MB",
    "MAX_FILES_PER_SESSION",
    "MAX_OUTPUT_FILES",
    "MAX_FILENAME_LENGTH",
    "SESSION_TTL_HOURS",
    "SESSION_CLEANUP_INTERVAL_MINUTES",
    "ENABLE_ORPHAN_S3_CLEANUP",
    "SANDBOX_POOL_ENABLED",
    "SANDBOX_POOL_WARMUP_ON_STARTUP",
    "SANDBOX_POOL_PY",
    "SANDBOX_POOL_PARALLEL_BATCH",
    "SANDBOX_POOL_REPLENISH_INTERVAL",
    "SANDBOX_POOL_EXHAUSTION_TRIGGER",
    "SANDBOX_UID",
    "REPL_ENABLED",
    "REPL_WARMUP_TIMEOUT_SECONDS",
    "STATE_PERSISTENCE_ENABLED",
    "STATE_TTL_SECONDS",
    "STATE_CAPTURE_ON_ERROR",
    "STATE_MAX_REDIS_SIZE_MB",
    "STATE_ARCHIVE_ENABLED",
    "STATE_ARCHIVE_AFTER_SECONDS",
    "STATE_ARCHIVE_TTL_DAYS",
    "STATE_ARCHIVE_CHECK_INTERVAL_SECONDS",
    "ENABLE_NETWORK_ISOLATION",
    "ENABLE_FILESYSTEM_ISOLATION",
    "ENABLE_SANDBOX_NETWORK",
    "SANDBOX_EGRESS_PORT",
    "SANDBOX_EGRESS_ALLOWLIST",
    "SKILL_DEPS_PATH",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "LOG_FILE",
    "LOG_MAX_SIZE_MB",
    "LOG_BACKUP_COUNT",
    "ENABLE_ACCESS_LOGS",
    "ENABLE_SECURITY_LOGS",
    "ENABLE_CORS",
    "CORS_ORIGINS",
    "ENABLE_DOCS",
]

# DESIGN §1's new variables.
DESIGN_VARIABLES = [
    "API_PORT",
    "DATA_DIR",
    "MAX_OUTPUT_MB",
    "MAX_REQUEST_JSON_MB",
    "MAX_RUN_DIR_MB",
    "MAX_CONCURRENT_RUNS",
    "RUN_QUEUE_SIZE",
    "KERNEL_MODE",
    "MAX_LIVE_KERNELS",
    "KERNEL_MEMORY_BUDGET_MB",
    "SHUTDOWN_GRACE_SECONDS",
    "AUTH_FAILURE_LIMIT",
    "AUTH_FAILURE_WINDOW_SECONDS",
    "AUTH_FAILURE_BLOCK_SECONDS",
    "TRUSTED_PROXIES",
    "METRICS_AUTH_ENABLED",
    "CODEAPI_JWT_ENABLED",
    "CODEAPI_JWT_PUBLIC_KEY",
    "CODEAPI_JWT_JWKS_FILE",
    "CODEAPI_JWT_JWKS_URL",
    "CODEAPI_JWT_ISSUER",
    "CODEAPI_JWT_AUDIENCE",
    "RATE_LIMIT_ENABLED",
    "PTC_TOKEN_TTL_SECONDS",
    "PTC_MAX_ROUNDS",
    "SKILL_DEPS_MAX_MB",
    "ZYGOTE_ROTATE_SESSIONS",
    "ZYGOTE_ROTATE_MINUTES",
]

# A non-default value for every variable, and what the effective settings (start log, GET /config) show.
NON_DEFAULTS: dict[str, tuple[str, object]] = {
    "PORT": ("9001", 9001),
    "API_HOST": ("127.0.0.2", "127.0.0.2"),
    "API_DEBUG": ("true", True),
    "API_RELOAD": ("1", True),
    "ENABLE_HTTPS": ("false", False),
    "SSL_CERTS_PATH": ("/srv/certs", "/srv/certs"),
    "SSL_CERT_FILE": ("/srv/c.pem", "/srv/c.pem"),
    "SSL_KEY_FILE": ("/srv/k.pem", "/srv/k.pem"),
    "SSL_CA_CERTS": ("/srv/ca.pem", "/srv/ca.pem"),
    "API_KEY": ("k" * 32, "***"),
    "API_KEYS": ("a" * 20 + "," + "b" * 20, ["***(2 keys)"]),
    "MASTER_API_KEY": ("m" * 32, "***"),
    "AUTH_ENABLED": ("false", False),
    "REDIS_HOST": ("redis.internal", "redis.internal"),
    "REDIS_PORT": ("6380", 6380),
    "REDIS_PASSWORD": ("hunter2hunter2", "***"),
    "REDIS_DB": ("3", 3),
    "REDIS_URL": ("redis://:pw@h:1/2", "***"),
    "REDIS_MAX_CONNECTIONS": ("7", 7),
    "REDIS_SOCKET_TIMEOUT": ("2.5", 2.5),
    "REDIS_SOCKET_CONNECT_TIMEOUT": ("1.5", 1.5),
    "S3_ENDPOINT": ("s3.internal:9000", "s3.internal:9000"),
    "S3_ACCESS_KEY": ("AKIAEXAMPLE", "***"),
    "S3_SECRET_KEY": ("secretsecret", "***"),
    "S3_SECURE": ("true", True),
    "S3_BUCKET": ("my-bucket", "my-bucket"),
    "S3_REGION": ("eu-west-1", "eu-west-1"),
    "NSJAIL_BINARY": ("/usr/local/bin/nsjail", "/usr/local/bin/nsjail"),
    "SANDBOX_BASE_DIR": ("/srv/sb", "/srv/sb"),
    "SANDBOX_TMPFS_SIZE_MB": ("64", 64),
    "SANDBOX_TTL_MINUTES": ("9", 9.0),
    "SANDBOX_CLEANUP_INTERVAL_MINUTES": ("3", 3.0),
    "MAX_EXECUTION_TIME": ("30", 30),
    "MAX_MEMORY_MB": ("256", 256),
    "MAX_FILE_SIZE_MB": ("10", 10),
    "MAX_FILES_PER_SESSION": ("50", 50),
    "MAX_OUTPUT_FILES": ("20", 20),
    "MAX_FILENAME_LENGTH": ("128", 128),
    "SESSION_TTL_HOURS": ("48", 48.0),
    "SESSION_CLEANUP_INTERVAL_MINUTES": ("15", 15.0),
    "ENABLE_ORPHAN_S3_CLEANUP": ("false", False),
    "SANDBOX_POOL_ENABLED": ("false", False),
    "SANDBOX_POOL_WARMUP_ON_STARTUP": ("false", False),
    "SANDBOX_POOL_PY": ("4", 4),
    "SANDBOX_POOL_PARALLEL_BATCH": ("2", 2),
    "SANDBOX_POOL_REPLENISH_INTERVAL": ("0.5", 0.5),
    "SANDBOX_POOL_EXHAUSTION_TRIGGER": ("false", False),
    "SANDBOX_UID": ("20000", 20000),
    "REPL_ENABLED": ("false", False),
    "REPL_WARMUP_TIMEOUT_SECONDS": ("30", 30.0),
    "STATE_PERSISTENCE_ENABLED": ("false", False),
    "STATE_TTL_SECONDS": ("60", 60),
    "STATE_CAPTURE_ON_ERROR": ("true", True),
    "STATE_MAX_REDIS_SIZE_MB": ("5", 5.0),
    "STATE_ARCHIVE_ENABLED": ("false", False),
    "STATE_ARCHIVE_AFTER_SECONDS": ("600", 600),
    "STATE_ARCHIVE_TTL_DAYS": ("7", 7.0),
    "STATE_ARCHIVE_CHECK_INTERVAL_SECONDS": ("30", 30.0),
    "ENABLE_NETWORK_ISOLATION": ("false", False),
    "ENABLE_FILESYSTEM_ISOLATION": ("true", True),
    "ENABLE_SANDBOX_NETWORK": ("true", True),
    "SANDBOX_EGRESS_PORT": ("20000", 20000),
    "SANDBOX_EGRESS_ALLOWLIST": ('["a.example", "b.example"]', ["a.example", "b.example"]),
    "SKILL_DEPS_PATH": ("/srv/deps", "/srv/deps"),
    "SANDBOX_VENV": ("/srv/venv", "/srv/venv"),
    "LOG_LEVEL": ("debug", "DEBUG"),
    "LOG_FORMAT": ("TEXT", "text"),
    "LOG_FILE": ("/var/log/x.log", "/var/log/x.log"),
    "LOG_MAX_SIZE_MB": ("10", 10.0),
    "LOG_BACKUP_COUNT": ("2", 2),
    "ENABLE_ACCESS_LOGS": ("true", True),
    "ENABLE_SECURITY_LOGS": ("false", False),
    "ENABLE_CORS": ("true", True),
    "CORS_ORIGINS": ("https://a.example, https://b.example", ["https://a.example", "https://b.example"]),
    "ENABLE_DOCS": ("false", False),
    "DATA_DIR": ("/srv/data", "/srv/data"),
    "MAX_OUTPUT_MB": ("2", 2.0),
    "MAX_REQUEST_JSON_MB": ("4", 4.0),
    "MAX_RUN_DIR_MB": ("128", 128),
    "MAX_CONCURRENT_RUNS": ("3", 3),
    "RUN_QUEUE_SIZE": ("5", 5),
    "KERNEL_MODE": ("NSJAIL", "nsjail"),
    "MAX_LIVE_KERNELS": ("4", 4),
    "KERNEL_MEMORY_BUDGET_MB": ("1024", 1024),
    "SHUTDOWN_GRACE_SECONDS": ("7", 7.0),
    "AUTH_FAILURE_LIMIT": ("3", 3),
    "AUTH_FAILURE_WINDOW_SECONDS": ("30", 30),
    "AUTH_FAILURE_BLOCK_SECONDS": ("90", 90),
    "TRUSTED_PROXIES": ("10.0.0.0/8,::1", ["10.0.0.0/8", "::1"]),
    "METRICS_AUTH_ENABLED": ("false", False),
    "CODEAPI_JWT_ENABLED": ("true", True),
    "CODEAPI_JWT_PUBLIC_KEY": ("/etc/jwt.pem", "/etc/jwt.pem"),
    "CODEAPI_JWT_JWKS_FILE": ("/etc/jwks.json", "/etc/jwks.json"),
    "CODEAPI_JWT_JWKS_URL": ("https://lc.example/jwks", "https://lc.example/jwks"),
    "CODEAPI_JWT_ISSUER": ("lc", "lc"),
    "CODEAPI_JWT_AUDIENCE": ("ci", "ci"),
    "RATE_LIMIT_ENABLED": ("false", False),
    "PTC_TOKEN_TTL_SECONDS": ("60", 60),
    "PTC_MAX_ROUNDS": ("5", 5),
    "SKILL_DEPS_MAX_MB": ("256", 256),
    "ZYGOTE_ROTATE_SESSIONS": ("10", 10),
    "ZYGOTE_ROTATE_MINUTES": ("5", 5.0),
}


def test_every_guide_and_design_variable_is_read() -> None:
    names = variable_names()
    missing = [name for name in GUIDE_VARIABLES + DESIGN_VARIABLES if name not in names]
    assert missing == []
    assert set(NON_DEFAULTS) | {"API_PORT"} == names


@pytest.mark.parametrize(("name", "case"), sorted(NON_DEFAULTS.items()))
def test_each_variable_changes_the_effective_settings(name: str, case: tuple[str, object]) -> None:
    raw, shown = case
    defaults = load_settings({}, env_file=None).redacted()
    effective = load_settings({name: raw}, env_file=None).redacted()
    assert effective[name] == shown
    assert defaults[name] != shown or name in SECRET_NAMES or name == "ENABLE_FILESYSTEM_ISOLATION"
    assert name in load_settings({name: raw}, env_file=None).given


SECRET_NAMES = {"API_KEY", "MASTER_API_KEY", "REDIS_PASSWORD", "REDIS_URL", "S3_ACCESS_KEY", "S3_SECRET_KEY"}


def test_secrets_never_appear_in_the_effective_settings() -> None:
    env = {name: NON_DEFAULTS[name][0] for name in SECRET_NAMES | {"API_KEYS"}}
    text = repr(load_settings(env, env_file=None).redacted())
    for value in env.values():
        for part in value.split(","):
            assert part not in text
    assert {f.upper() for f in SECRET_FIELDS} <= SECRET_NAMES | {"API_KEYS"}


def test_names_are_case_insensitive() -> None:
    assert load_settings({"max_memory_mb": "256"}, env_file=None).max_memory_mib == 256


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("k1-aaaaaaaaaaaaaaaa,k2-bbbbbbbbbbbbbbbb", ["k1-aaaaaaaaaaaaaaaa", "k2-bbbbbbbbbbbbbbbb"]),
        (" k1 , ,k2 ", ["k1", "k2"]),
        ('["k1", "k2"]', ["k1", "k2"]),
        ("", []),
    ],
)
def test_lists_take_commas_or_json(raw: str, expected: list[str]) -> None:
    settings = load_settings({"API_KEYS": raw, "CORS_ORIGINS": raw}, env_file=None)
    assert settings.api_keys == expected
    assert settings.cors_origins == expected


def test_api_keys_extend_api_key_without_duplicates() -> None:
    settings = load_settings({"API_KEY": "primary-key-0000000", "API_KEYS": "x,primary-key-0000000"}, env_file=None)
    assert settings.all_api_keys == ("primary-key-0000000", "x")


def test_api_port_is_an_alias_of_port() -> None:
    assert load_settings({"API_PORT": "9100"}, env_file=None).port == 9100
    assert load_settings({"API_PORT": "9100", "PORT": "9100"}, env_file=None).port == 9100
    with pytest.raises(SettingsError, match="PORT and API_PORT"):
        load_settings({"API_PORT": "9100", "PORT": "9200"}, env_file=None)


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_MEMORY_MB=300\nLOG_LEVEL=warning\n# comment\nREDIS_HOST=r1\n")
    settings = load_settings({"LOG_LEVEL": "ERROR"}, env_file=env_file)
    assert settings.max_memory_mib == 300
    assert settings.log_level == "ERROR"
    assert settings.kv_backend == "redis"  # given through the file counts as given


@pytest.mark.parametrize(
    ("env", "kv", "blobs"),
    [
        ({}, "sqlite", "dir"),
        ({"REDIS_HOST": "localhost"}, "redis", "dir"),  # the default value, but given: Redis
        ({"REDIS_URL": "redis://localhost:6379/0"}, "redis", "dir"),
        ({"REDIS_PORT": "6380"}, "sqlite", "dir"),  # a port alone selects nothing
        ({"S3_ENDPOINT": "localhost:3900"}, "sqlite", "s3"),
        ({"REDIS_HOST": "r", "S3_ENDPOINT": "s:1"}, "redis", "s3"),
    ],
)
def test_stores_are_selected_by_what_was_given(env: dict[str, str], kv: str, blobs: str) -> None:
    settings = load_settings(env, env_file=None)
    assert (settings.kv_backend, settings.blob_backend) == (kv, blobs)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAX_MEMORY_MB": "lots"}, "MAX_MEMORY_MB"),
        ({"MAX_MEMORY_MB": "8"}, "MAX_MEMORY_MB"),
        ({"PORT": "70000"}, "PORT"),
        ({"API_PORT": "-1"}, "PORT"),
        ({"AUTH_ENABLED": "maybe"}, "AUTH_ENABLED"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"KERNEL_MODE": "docker"}, "KERNEL_MODE"),
        ({"SANDBOX_TMPFS_SIZE_MB": "5000"}, "SANDBOX_TMPFS_SIZE_MB"),
        ({"SANDBOX_UID": "0"}, "SANDBOX_UID"),
        ({"CORS_ORIGINS": "[1, 2]"}, "CORS_ORIGINS"),
        ({"API_KEYS": "[not json"}, "API_KEYS"),
        ({"TRUSTED_PROXIES": "10.0.0.0/8,nonsense"}, "TRUSTED_PROXIES"),
        ({"S3_ENDPOINT": "http://s3:9000"}, "S3_ENDPOINT"),
        ({"ENABLE_FILESYSTEM_ISOLATION": "false"}, "ENABLE_FILESYSTEM_ISOLATION"),
        ({"API_KEY": ""}, "API_KEY"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env, env_file=None)
    message = str(info.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "variable"),
    [({"MAX_EXECUTION_TIME": "forever"}, "MAX_EXECUTION_TIME"), ({"ENABLE_FILESYSTEM_ISOLATION": "false"}, "ENABLE_")],
)
def test_cli_exits_2_with_one_line(env: dict[str, str], variable: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "interpreter", "serve"],
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]


def test_empty_optional_values_mean_unset() -> None:
    settings = load_settings({"ENABLE_HTTPS": "", "LOG_FILE": " ", "MASTER_API_KEY": ""}, env_file=None)
    assert settings.enable_https is None
    assert settings.log_file is None
    assert settings.master_api_key is None


def test_docker_ssl_paths_resolve_against_ssl_certs_path(tmp_path: Path) -> None:
    settings = load_settings(
        {"SSL_CERTS_PATH": str(tmp_path), "SSL_CERT_FILE": "/app/ssl/live/x.example/fullchain.pem"}, env_file=None
    )
    assert settings.ssl_cert_path == tmp_path / "live/x.example/fullchain.pem"
    assert settings.ssl_key_path == tmp_path / "privkey.pem"  # the /app/ssl default, mapped
    relative = load_settings({"SSL_CERTS_PATH": str(tmp_path), "SSL_KEY_FILE": "k.pem"}, env_file=None)
    assert relative.ssl_key_path == tmp_path / "k.pem"
    absolute = load_settings({"SSL_KEY_FILE": "/etc/k.pem"}, env_file=None)
    assert absolute.ssl_key_path == Path("/etc/k.pem")


def test_https_auto_rule(tmp_path: Path) -> None:
    env = {"SSL_CERTS_PATH": str(tmp_path)}
    assert load_settings(env, env_file=None).https_enabled is False  # unset and no files: HTTP
    (tmp_path / "fullchain.pem").write_text("x")
    assert load_settings(env, env_file=None).https_enabled is False  # the key is still missing
    (tmp_path / "privkey.pem").write_text("x")
    assert load_settings(env, env_file=None).https_enabled is True  # both exist: HTTPS
    assert load_settings({**env, "ENABLE_HTTPS": "false"}, env_file=None).https_enabled is False


def test_settings_are_frozen() -> None:
    settings = load_settings({}, env_file=None)
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)


def test_only_the_given_mapping_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_MEMORY_MB", "999")
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    settings = load_settings({}, env_file=None)
    assert settings.max_memory_mib == 512
    assert str(settings.ssl_cert_file) == "/app/ssl/fullchain.pem"
    assert settings.given == frozenset()
    assert load_settings(env_file=None).max_memory_mib == 999  # the default mapping is os.environ
