"""Settings: one frozen object, built once in ``__main__`` and passed down in slices.

The environment variable names are exactly those of the configuration guide plus the new ones of
DESIGN §1, with no prefix; a ``.env`` file in the working directory is read too (the environment
wins). Python-side field names carry their unit. ``load_settings`` also records which variables
were *given*, because DESIGN §4 selects the stores by that, not by value.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from interpreter.errors import SettingsError

DEFAULT_API_KEY = "test-api-key"  # the guide's default, kept for compatibility (DESIGN §1)
DOCKER_SSL_DIR = "/app/ssl"  # the guide's in-container certificate directory
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

# Fields whose value must never reach a log line, /config or an error message.
SECRET_FIELDS = frozenset(
    {"api_key", "api_keys", "master_api_key", "redis_password", "redis_url", "s3_access_key", "s3_secret_key"}
)

StrList = Annotated[list[str], NoDecode]


def _split_list(value: object) -> object:
    """Accept a comma-separated list or a JSON list (the guide documents commas; the reference crashed on them)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON list ({exc.msg})") from None
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            raise ValueError("a JSON list must contain only strings")
        return [item.strip() for item in parsed if item.strip()]
    return [item.strip() for item in text.split(",") if item.strip()]


class Settings(BaseSettings):
    """Every variable of the configuration guide and DESIGN §1. Immutable once built."""

    model_config = SettingsConfigDict(frozen=True, case_sensitive=False, extra="ignore", populate_by_name=True)

    # --- API ---------------------------------------------------------------------------------
    port: int = Field(8000, ge=0, le=65535, validation_alias=AliasChoices("PORT", "API_PORT"))
    api_host: str = Field("0.0.0.0", alias="API_HOST", min_length=1)
    api_debug: bool = Field(False, alias="API_DEBUG")
    api_reload: bool = Field(False, alias="API_RELOAD")

    # --- HTTPS -------------------------------------------------------------------------------
    enable_https: bool | None = Field(None, alias="ENABLE_HTTPS")  # None: auto (both files exist)
    ssl_certs_path: Path = Field(Path("./ssl"), alias="SSL_CERTS_PATH")
    ssl_cert_file: Path = Field(Path(f"{DOCKER_SSL_DIR}/fullchain.pem"), alias="SSL_CERT_FILE")
    ssl_key_file: Path = Field(Path(f"{DOCKER_SSL_DIR}/privkey.pem"), alias="SSL_KEY_FILE")
    ssl_ca_certs: Path | None = Field(None, alias="SSL_CA_CERTS")

    # --- Authentication ------------------------------------------------------------------------
    api_key: str = Field(DEFAULT_API_KEY, alias="API_KEY", min_length=1)
    api_keys: StrList = Field(default_factory=list, alias="API_KEYS")
    master_api_key: str | None = Field(None, alias="MASTER_API_KEY")
    auth_enabled: bool = Field(True, alias="AUTH_ENABLED")
    rate_limit_enabled: bool = Field(True, alias="RATE_LIMIT_ENABLED")
    auth_failure_limit: int = Field(10, ge=1, alias="AUTH_FAILURE_LIMIT")
    auth_failure_window_s: int = Field(60, ge=1, alias="AUTH_FAILURE_WINDOW_SECONDS")
    auth_failure_block_s: int = Field(300, ge=1, alias="AUTH_FAILURE_BLOCK_SECONDS")
    trusted_proxies: StrList = Field(default_factory=list, alias="TRUSTED_PROXIES")
    metrics_auth_enabled: bool = Field(True, alias="METRICS_AUTH_ENABLED")
    codeapi_jwt_enabled: bool = Field(False, alias="CODEAPI_JWT_ENABLED")
    codeapi_jwt_public_key: str | None = Field(None, alias="CODEAPI_JWT_PUBLIC_KEY")
    codeapi_jwt_jwks_file: Path | None = Field(None, alias="CODEAPI_JWT_JWKS_FILE")
    codeapi_jwt_jwks_url: str | None = Field(None, alias="CODEAPI_JWT_JWKS_URL")
    codeapi_jwt_issuer: str = Field("librechat", alias="CODEAPI_JWT_ISSUER")
    codeapi_jwt_audience: str = Field("codeapi", alias="CODEAPI_JWT_AUDIENCE")

    # --- Redis (selected when REDIS_URL or REDIS_HOST is given) -------------------------------------
    redis_host: str = Field("localhost", alias="REDIS_HOST")
    redis_port: int = Field(6379, ge=1, le=65535, alias="REDIS_PORT")
    redis_password: str | None = Field(None, alias="REDIS_PASSWORD")
    redis_db: int = Field(0, ge=0, alias="REDIS_DB")
    redis_url: str | None = Field(None, alias="REDIS_URL")
    redis_max_connections: int = Field(20, ge=1, alias="REDIS_MAX_CONNECTIONS")
    redis_socket_timeout_s: float = Field(5, gt=0, alias="REDIS_SOCKET_TIMEOUT")
    redis_socket_connect_timeout_s: float = Field(5, gt=0, alias="REDIS_SOCKET_CONNECT_TIMEOUT")

    # --- S3 (selected when S3_ENDPOINT is given) -------------------------------------------------
    s3_endpoint: str = Field("localhost:3900", alias="S3_ENDPOINT", min_length=1)
    s3_access_key: str = Field("test-access-key", alias="S3_ACCESS_KEY")
    s3_secret_key: str = Field("test-secret-key", alias="S3_SECRET_KEY")
    s3_secure: bool = Field(False, alias="S3_SECURE")
    s3_bucket: str = Field("code-interpreter-files", alias="S3_BUCKET", min_length=3, max_length=63)
    s3_region: str = Field("garage", alias="S3_REGION", min_length=1)

    # --- Embedded store ---------------------------------------------------------------------------
    data_dir: Path = Field(Path("/var/lib/code-interpreter/data"), alias="DATA_DIR")

    # --- Sandbox ----------------------------------------------------------------------------------
    nsjail_binary: str = Field("nsjail", alias="NSJAIL_BINARY", min_length=1)
    sandbox_base_dir: Path = Field(Path("/var/lib/code-interpreter/sandboxes"), alias="SANDBOX_BASE_DIR")
    sandbox_tmpfs_size_mib: int = Field(100, ge=10, le=1024, alias="SANDBOX_TMPFS_SIZE_MB")
    sandbox_ttl_min: float = Field(5, gt=0, alias="SANDBOX_TTL_MINUTES")
    sandbox_cleanup_interval_min: float = Field(5, gt=0, alias="SANDBOX_CLEANUP_INTERVAL_MINUTES")
    sandbox_uid: int = Field(1001, ge=1, le=2**31 - 1, alias="SANDBOX_UID")
    max_execution_time_s: int = Field(120, ge=1, le=3600, alias="MAX_EXECUTION_TIME")
    max_memory_mib: int = Field(512, ge=64, le=1024 * 1024, alias="MAX_MEMORY_MB")
    max_output_mib: float = Field(1, gt=0, le=1024, alias="MAX_OUTPUT_MB")
    max_run_dir_mib: int = Field(256, ge=1, alias="MAX_RUN_DIR_MB")
    max_concurrent_runs: int = Field(0, ge=0, alias="MAX_CONCURRENT_RUNS")  # 0 = 2 x cores
    run_queue_size: int = Field(64, ge=0, alias="RUN_QUEUE_SIZE")
    enable_network_isolation: bool = Field(True, alias="ENABLE_NETWORK_ISOLATION")
    enable_filesystem_isolation: bool = Field(True, alias="ENABLE_FILESYSTEM_ISOLATION")
    enable_sandbox_network: bool = Field(False, alias="ENABLE_SANDBOX_NETWORK")
    sandbox_egress_port: int = Field(18443, ge=1024, le=65535, alias="SANDBOX_EGRESS_PORT")
    sandbox_egress_allowlist: StrList = Field(default_factory=list, alias="SANDBOX_EGRESS_ALLOWLIST")
    sandbox_venv: Path = Field(Path("/opt/interpreter/sandbox-venv"), alias="SANDBOX_VENV")
    skill_deps_path: Path = Field(Path("/opt/skill-deps"), alias="SKILL_DEPS_PATH")
    skill_deps_max_mib: int = Field(1024, ge=0, alias="SKILL_DEPS_MAX_MB")

    # --- Files --------------------------------------------------------------------------------------
    max_file_size_mib: int = Field(100, ge=1, le=10 * 1024, alias="MAX_FILE_SIZE_MB")
    max_files_per_session: int = Field(300, ge=1, le=10_000, alias="MAX_FILES_PER_SESSION")
    max_output_files: int = Field(10, ge=1, le=1000, alias="MAX_OUTPUT_FILES")
    max_filename_length: int = Field(255, ge=1, le=255, alias="MAX_FILENAME_LENGTH")
    max_request_json_mib: float = Field(16, gt=0, le=1024, alias="MAX_REQUEST_JSON_MB")

    # --- Sessions -----------------------------------------------------------------------------------
    session_ttl_h: float = Field(24, gt=0, alias="SESSION_TTL_HOURS")
    session_cleanup_interval_min: float = Field(60, gt=0, alias="SESSION_CLEANUP_INTERVAL_MINUTES")
    enable_orphan_s3_cleanup: bool = Field(True, alias="ENABLE_ORPHAN_S3_CLEANUP")

    # --- Python kernels: pool, REPL, zygote -----------------------------------------------------------
    sandbox_pool_enabled: bool = Field(True, alias="SANDBOX_POOL_ENABLED")
    sandbox_pool_warmup_on_startup: bool = Field(True, alias="SANDBOX_POOL_WARMUP_ON_STARTUP")
    sandbox_pool_py: int = Field(2, ge=0, le=256, alias="SANDBOX_POOL_PY")
    sandbox_pool_parallel_batch: int = Field(5, ge=1, le=64, alias="SANDBOX_POOL_PARALLEL_BATCH")
    sandbox_pool_replenish_interval_s: float = Field(2, ge=0, alias="SANDBOX_POOL_REPLENISH_INTERVAL")
    sandbox_pool_exhaustion_trigger: bool = Field(True, alias="SANDBOX_POOL_EXHAUSTION_TRIGGER")
    repl_enabled: bool = Field(True, alias="REPL_ENABLED")
    repl_warmup_timeout_s: float = Field(15, gt=0, alias="REPL_WARMUP_TIMEOUT_SECONDS")
    kernel_mode: Literal["auto", "zygote", "nsjail"] = Field("auto", alias="KERNEL_MODE")
    max_live_kernels: int = Field(16, ge=0, le=4096, alias="MAX_LIVE_KERNELS")
    kernel_memory_budget_mib: int = Field(4096, ge=0, alias="KERNEL_MEMORY_BUDGET_MB")
    zygote_rotate_sessions: int = Field(1000, ge=1, alias="ZYGOTE_ROTATE_SESSIONS")
    zygote_rotate_min: float = Field(60, gt=0, alias="ZYGOTE_ROTATE_MINUTES")

    # --- Python state ----------------------------------------------------------------------------
    state_persistence_enabled: bool = Field(True, alias="STATE_PERSISTENCE_ENABLED")
    state_ttl_s: int = Field(7200, ge=1, alias="STATE_TTL_SECONDS")
    state_capture_on_error: bool = Field(False, alias="STATE_CAPTURE_ON_ERROR")
    state_max_redis_size_mib: float = Field(100, ge=0, alias="STATE_MAX_REDIS_SIZE_MB")
    state_archive_enabled: bool = Field(True, alias="STATE_ARCHIVE_ENABLED")
    state_archive_after_s: int = Field(3600, ge=1, alias="STATE_ARCHIVE_AFTER_SECONDS")
    state_archive_ttl_days: float = Field(1, gt=0, alias="STATE_ARCHIVE_TTL_DAYS")
    state_archive_check_interval_s: float = Field(300, gt=0, alias="STATE_ARCHIVE_CHECK_INTERVAL_SECONDS")

    # --- Programmatic tool calling -------------------------------------------------------------------
    ptc_token_ttl_s: int = Field(300, ge=1, alias="PTC_TOKEN_TTL_SECONDS")
    ptc_max_rounds: int = Field(50, ge=1, alias="PTC_MAX_ROUNDS")

    # --- Logging ------------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field("INFO", alias="LOG_LEVEL")
    log_format: Literal["json", "text"] = Field("json", alias="LOG_FORMAT")
    log_file: Path | None = Field(None, alias="LOG_FILE")
    log_max_size_mib: float = Field(100, gt=0, alias="LOG_MAX_SIZE_MB")
    log_backup_count: int = Field(5, ge=0, alias="LOG_BACKUP_COUNT")
    enable_access_logs: bool = Field(False, alias="ENABLE_ACCESS_LOGS")
    enable_security_logs: bool = Field(True, alias="ENABLE_SECURITY_LOGS")

    # --- Development / HTTP ---------------------------------------------------------------------------
    enable_cors: bool = Field(False, alias="ENABLE_CORS")
    cors_origins: StrList = Field(default_factory=list, alias="CORS_ORIGINS")
    enable_docs: bool = Field(True, alias="ENABLE_DOCS")
    shutdown_grace_s: float = Field(20, ge=0, le=3600, alias="SHUTDOWN_GRACE_SECONDS")

    # Which variables the operator gave (environment or .env), by canonical name. Not a variable.
    given: frozenset[str] = Field(default_factory=frozenset, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges the environment over .env itself, so that what was *given* is known
        # exactly (DESIGN §4); the model must not read either source a second time on its own.
        return (init_settings,)

    _split = field_validator("api_keys", "cors_origins", "trusted_proxies", "sandbox_egress_allowlist", mode="before")(
        _split_list
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", "kernel_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "enable_https",
        "ssl_ca_certs",
        "log_file",
        "master_api_key",
        "redis_url",
        "redis_password",
        "codeapi_jwt_public_key",
        "codeapi_jwt_jwks_file",
        "codeapi_jwt_jwks_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `ENABLE_HTTPS=` or `LOG_FILE=` in an env file means "not set", not an invalid value.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (CIDR)") from None
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _no_scheme(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("give host:port without a scheme; S3_SECURE chooses https")
        return value

    @field_validator("enable_filesystem_isolation")
    @classmethod
    def _fs_isolation_required(cls, value: bool) -> bool:
        if not value:
            raise ValueError("cannot be turned off: there is no safe way to run code without it")
        return value

    # --- Derived values ---------------------------------------------------------------------------

    @property
    def ssl_cert_path(self) -> Path:
        return _resolve_ssl_path(self.ssl_cert_file, self.ssl_certs_path)

    @property
    def ssl_key_path(self) -> Path:
        return _resolve_ssl_path(self.ssl_key_file, self.ssl_certs_path)

    @property
    def ssl_ca_path(self) -> Path | None:
        return None if self.ssl_ca_certs is None else _resolve_ssl_path(self.ssl_ca_certs, self.ssl_certs_path)

    @property
    def https_enabled(self) -> bool:
        """ENABLE_HTTPS, or when unset ("auto") whether both the certificate and the key exist."""
        if self.enable_https is not None:
            return self.enable_https
        return self.ssl_cert_path.is_file() and self.ssl_key_path.is_file()

    @property
    def kv_backend(self) -> Literal["redis", "sqlite"]:
        return "redis" if self.given & {"REDIS_URL", "REDIS_HOST"} else "sqlite"

    @property
    def blob_backend(self) -> Literal["s3", "dir"]:
        return "s3" if "S3_ENDPOINT" in self.given else "dir"

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        return (self.api_key, *(key for key in self.api_keys if key != self.api_key))

    @property
    def max_request_json_bytes(self) -> int:
        return int(self.max_request_json_mib * 1024 * 1024)

    @property
    def max_upload_bytes(self) -> int:
        # The whole multipart body; the per-file cap is applied while parsing it (files issue).
        return self.max_file_size_mib * 1024 * 1024 * self.max_files_per_session + 1024 * 1024

    def redacted(self) -> dict[str, Any]:
        """The effective settings by variable name, secrets replaced: for the start log and GET /config."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            if name == "given":
                continue
            value = getattr(self, name)
            if name in SECRET_FIELDS:
                value = _redact(value)
            elif isinstance(value, Path):
                value = str(value)
            out[_env_name(name, field.alias)] = value
        return out


def _redact(value: object) -> object:
    if value in (None, "", []):
        return value
    if isinstance(value, list):
        return [f"***({len(value)} keys)"]
    return "***"


def _env_name(field_name: str, alias: str | None) -> str:
    return alias or ("PORT" if field_name == "port" else field_name.upper())


def _resolve_ssl_path(path: Path, certs_dir: Path) -> Path:
    """Map the guide's in-container paths (/app/ssl/...) and relative paths onto SSL_CERTS_PATH."""
    text = str(path)
    if text == DOCKER_SSL_DIR or text.startswith(DOCKER_SSL_DIR + "/"):
        return certs_dir / text[len(DOCKER_SSL_DIR) :].lstrip("/")
    return path if path.is_absolute() else certs_dir / path


def variable_names() -> frozenset[str]:
    """Every environment variable the settings read (API_PORT included)."""
    names = {_env_name(name, field.alias) for name, field in Settings.model_fields.items() if name != "given"}
    return frozenset(names | {"API_PORT"})


def load_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")) -> Settings:
    """Build the settings from ``environ`` (default ``os.environ``) over ``env_file``.

    Raises:
        SettingsError: one line naming the variable and why it is invalid.
    """
    environ = os.environ if environ is None else environ
    known = variable_names()
    from_file: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        from_file = {k.upper(): v for k, v in dotenv_values(env_file).items() if v is not None}
    from_env = {k.upper(): v for k, v in environ.items()}
    merged = {k: v for k, v in {**from_file, **from_env}.items() if k in known}

    port, api_port = merged.get("PORT"), merged.pop("API_PORT", None)
    if api_port is not None:
        if port is not None and port.strip() != api_port.strip():
            raise SettingsError(f"PORT and API_PORT are both set and differ ({port} != {api_port})")
        merged["PORT"] = api_port
    given = frozenset(merged) | ({"API_PORT"} if api_port is not None else frozenset())
    try:
        return Settings.model_validate({**merged, "given": given})
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = str(err["loc"][0]) if err["loc"] else "settings"
    field = Settings.model_fields.get(loc)
    name = _env_name(loc, field.alias) if field else loc.upper()
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{name}: {message}"
