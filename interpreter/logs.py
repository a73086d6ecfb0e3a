"""Logging: JSON or text lines to stderr or a rotating file, with secrets and query strings redacted.

Callers use stdlib loggers and pass structured fields as
``log.info("run finished", extra={"fields": {"language": "py"}})``. Every line carries the current
request id when there is one. Keys, query strings and
registered secret values are scrubbed from every line, whatever logger produced it (hypercorn's
included), so a mistake elsewhere cannot leak them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_QUERY = re.compile(r"(?<=[\w/])\?[^\s\"']*")
_KEY_HEADERS = re.compile(r"(?i)((?:x-api-key|authorization)[\"']?\s*[:=]\s*[\"']?)([^\s\"',}]+(?: [^\s\"',}]+)?)")
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class Redactor(logging.Filter):
    """Scrubs secrets from the rendered message and the structured fields of every record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a key that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = _KEY_HEADERS.sub(r"\1***", text)
        return _QUERY.sub("?<redacted>", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrub(record.getMessage())
        record.args = None
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = {k: self.scrub(v) if isinstance(v, str) else v for k, v in fields.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
    # Loggers we do not own (hypercorn, quart) may pass `extra=`; keep those too.
    fields.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and k != "fields"})
    request_id = request_id_var.get()
    if request_id and "request_id" not in fields:
        fields["request_id"] = request_id
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}" + (f" {extras}" if extras else "")
        return text + (f"\n{record.exc_text}" if record.exc_text else "")


def configure_logging(
    *,
    level: str,
    fmt: str,
    file: Path | None,
    max_size_mib: float,
    backup_count: int,
    secrets: Iterable[str],
    security_logs: bool,
) -> None:
    """Install the one root handler. Idempotent: called again it replaces the previous handler."""
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=int(max_size_mib * 1024 * 1024), backupCount=backup_count, encoding="utf-8"
        )
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(Redactor(secrets))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("interpreter.security").disabled = not security_logs
    # Third-party chatter stays at WARNING unless we are debugging.
    for noisy in ("hypercorn.error", "quart.app", "quart.serving", "asyncio", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(level if level == "DEBUG" else "WARNING")
    logging.captureWarnings(True)
