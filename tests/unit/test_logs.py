"""Log lines: JSON or text, rotation, and no secret or query string in any of them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from interpreter.logs import configure_logging, request_id_var

SECRET = "sk-very-secret-key-0123456789"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("interpreter.security").disabled = False


def setup(tmp_path: Path, **overrides: object) -> Path:
    path = tmp_path / "logs" / "server.log"
    options: dict[str, object] = {
        "level": "DEBUG",
        "fmt": "json",
        "file": path,
        "max_size_mib": 1,
        "backup_count": 2,
        "secrets": [SECRET],
        "security_logs": True,
    }
    options.update(overrides)
    configure_logging(**options)  # type: ignore[arg-type]
    return path


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_fields_and_request_id(tmp_path: Path) -> None:
    path = setup(tmp_path)
    token = request_id_var.set("req-123456789")
    try:
        logging.getLogger("interpreter.test").info("run finished", extra={"fields": {"language": "py", "exit_code": 0}})
    finally:
        request_id_var.reset(token)
    (line,) = lines(path)
    assert line["msg"] == "run finished"
    assert line["level"] == "info"
    assert line["language"] == "py"
    assert line["exit_code"] == 0
    assert line["request_id"] == "req-123456789"


@pytest.mark.usefixtures("restore_logging")
def test_secrets_and_query_strings_are_scrubbed_everywhere(tmp_path: Path) -> None:
    path = setup(tmp_path)
    log = logging.getLogger("interpreter.test")
    log.warning(f"key was {SECRET}", extra={"fields": {"header": f"x-api-key: {SECRET}"}})
    log.info("GET /files/abc?api_key=hunter2&x=1 done")
    logging.getLogger("hypercorn.error").warning("request %s", "/v1/exec?token=abcdef")
    logging.getLogger("thirdparty").error("auth header authorization: Basic c2VjcmV0Og==")
    try:
        raise ValueError(SECRET)
    except ValueError:
        log.exception("failed")
    text = path.read_text()
    for leaked in (SECRET, "hunter2", "abcdef", "c2VjcmV0Og=="):
        assert leaked not in text
    assert "?<redacted>" in text
    assert "ValueError" in text


@pytest.mark.usefixtures("restore_logging")
def test_text_format(tmp_path: Path) -> None:
    path = setup(tmp_path, fmt="text")
    logging.getLogger("interpreter.test").warning("hello", extra={"fields": {"a": 1}})
    (line,) = path.read_text().splitlines()
    assert "WARNING" in line
    assert "interpreter.test: hello a=1" in line


@pytest.mark.usefixtures("restore_logging")
def test_level_filters(tmp_path: Path) -> None:
    path = setup(tmp_path, level="WARNING")
    log = logging.getLogger("interpreter.test")
    log.info("quiet")
    log.warning("loud")
    assert [line["msg"] for line in lines(path)] == ["loud"]


@pytest.mark.usefixtures("restore_logging")
def test_file_rotation_keeps_backup_count(tmp_path: Path) -> None:
    path = setup(tmp_path, max_size_mib=0.01, backup_count=2)  # ~10 KiB per file
    log = logging.getLogger("interpreter.test")
    for i in range(400):
        log.info("filler line", extra={"fields": {"n": i, "pad": "x" * 100}})
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    assert all(p.stat().st_size <= 11 * 1024 for p in path.parent.iterdir())


@pytest.mark.usefixtures("restore_logging")
def test_security_logs_can_be_turned_off(tmp_path: Path) -> None:
    path = setup(tmp_path, security_logs=False)
    logging.getLogger("interpreter.security").warning("authentication failed")
    logging.getLogger("interpreter.test").warning("other")
    assert [line["msg"] for line in lines(path)] == ["other"]
