"""The command line, and the binary's one entry point: ``serve``, ``doctor``, ``--version``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

from interpreter import __version__, keys_cli
from interpreter.errors import SettingsError
from interpreter.settings import Settings, load_settings
from interpreter.stores.protocols import StoreError

EXIT_CONFIG = 2


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"interpreter: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _serve(run: Callable[[Settings], Awaitable[None]] | None = None) -> int:
    """``interpreter serve``; ``run`` replaces ``interpreter.main.serve`` (the test suite's entry points only)."""
    import trio

    from interpreter.logs import configure_logging
    from interpreter.main import serve

    settings = _settings_or_exit()
    if settings.https_enabled:
        # OpenSSL reads SSL_CERT_FILE as its CA bundle; here it names our server certificate, and
        # left in place it would break every outbound TLS verification (S3, JWKS) of this process.
        os.environ.pop("SSL_CERT_FILE", None)
    configure_logging(
        level=settings.log_level,
        fmt=settings.log_format,
        file=settings.log_file,
        max_size_mib=settings.log_max_size_mib,
        backup_count=settings.log_backup_count,
        secrets=[
            *settings.all_api_keys,
            settings.master_api_key or "",
            settings.redis_password or "",
            settings.s3_secret_key,
            settings.redis_url or "",
        ],
        security_logs=settings.enable_security_logs,
    )
    status = 0
    try:
        trio.run(run or serve, settings)
    except* SettingsError as group:  # also when raised inside a nursery (wrapped in a group)
        print(f"interpreter: invalid configuration: {_first(group)}", file=sys.stderr)
        status = EXIT_CONFIG
    except* StoreError as group:
        print(f"interpreter: storage unavailable at start: {_first(group)}", file=sys.stderr)
        status = 1
    except* KeyboardInterrupt:
        status = 130
    return status


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _doctor() -> int:
    from interpreter.doctor import run_doctor

    return run_doctor(_settings_or_exit())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interpreter", description="Sandboxed Code Interpreter API")
    parser.add_argument("--version", action="version", version=f"interpreter {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the API server (settings from the environment and ./.env)")
    commands.add_parser("doctor", help="check that this machine can run sandboxes, and explain what is missing")
    keys_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve()
    if args.command == "doctor":
        return _doctor()
    if args.command == "keys":
        return keys_cli.run(_settings_or_exit(), args)
    parser.print_help()
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
