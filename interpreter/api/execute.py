"""``POST /exec``: run code, answer with its output, a status and an exit code.

A reply not ready after ~3 s is sent as ``200 application/json`` with whitespace keepalives
until the JSON (Node clients drop sockets idle for 5 s); a failure after the first keepalive is
the error envelope inside that 200 body.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response, current_app

from interpreter.api.app import AppDeps, current_principal
from interpreter.api.bodies import json_body
from interpreter.api.envelope import envelope, new_request_id
from interpreter.api.openapi import documented
from interpreter.errors import BadRequest, InterpreterError, ServiceUnavailable
from interpreter.execution.executor import RunHandle, clamp_timeout_s, wait_or_timeout
from interpreter.execution.runner import Job, RunResult

log = logging.getLogger("interpreter.exec")
blueprint = Blueprint("exec", __name__)

KEEPALIVE_AFTER_S = 3.0
KEEPALIVE_EVERY_S = 3.0
ENTITY_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class FileRef(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    name: str
    session_id: str | None = None
    storage_session_id: str | None = None


class ExecRequest(BaseModel):
    """The reference's request; unknown fields are ignored (LibreChat sends extra ones)."""

    model_config = ConfigDict(extra="ignore")
    code: str
    lang: str
    args: Any = None
    stdin: str | None = Field(None, description="Given to the program on its standard input")
    session_id: str | None = None
    files: list[FileRef] = Field(default_factory=list)
    user_id: str | None = None
    entity_id: str | None = None
    timeout: int | None = Field(None, ge=1000, le=300_000, description="milliseconds")

    @field_validator("entity_id")
    @classmethod
    def _entity(cls, value: str | None) -> str | None:
        if value is not None and not ENTITY_ID.match(value):
            raise ValueError("entity_id must be 1-40 characters of letters, digits, _ and -")
        return value


class ExecResponse(BaseModel):
    session_id: str
    files: list[dict[str, Any]]
    stdout: str
    stderr: str
    exit_code: int | None
    status: Literal["ok", "error", "timeout", "memory_limit", "output_limit", "killed"]
    duration_ms: int
    language: str
    truncated: bool
    runtime_session_id: str
    runtime_status: Literal["new", "reused", "restored"]


def normalize_args(value: Any) -> tuple[str, ...]:
    """The reference's rules: null → none; a string → [s] unless blank; a list → its non-blank items as text."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list):
        return tuple(str(item) for item in value if item is not None and str(item).strip())
    return (str(value),)


def _deps() -> AppDeps:
    deps: AppDeps = current_app.extensions["deps"]
    return deps


def build_job(body: ExecRequest) -> Job:
    deps = _deps()
    code = body.lang.strip().lower()
    language = deps.languages.get(code)
    if language is None:
        raise BadRequest(
            f"Unsupported programming language: {body.lang[:40]}",
            details=[{"field": "lang", "message": f"Language '{body.lang[:40]}' is not supported",
                      "code": "unsupported_language"}],
        )  # fmt: skip
    if not body.code.strip():
        raise BadRequest(
            "Code cannot be empty",
            details=[{"field": "code", "message": "Code field is required and cannot be empty", "code": "empty_code"}],
        )
    args = normalize_args(body.args)
    if any("\x00" in arg for arg in args):  # no program can receive one: argv strings end at NUL
        raise BadRequest(
            "Arguments cannot contain NUL characters",
            details=[{"field": "args", "message": "NUL characters are not allowed", "code": "invalid_args"}],
        )
    timeout_s = clamp_timeout_s(body.timeout, deps.settings.max_execution_time_s)
    stdin = body.stdin.encode() if body.stdin is not None else None
    return Job(language=language, code=body.code, args=args, stdin=stdin, timeout_s=timeout_s)


def render(result: RunResult, language: str, session_id: str) -> dict[str, Any]:
    stderr = result.stderr.decode("utf-8", errors="replace")
    if result.notes:
        stderr += ("" if not stderr or stderr.endswith("\n") else "\n") + "\n".join(result.notes) + "\n"
    return ExecResponse(
        session_id=session_id, files=[], stdout=result.stdout.decode("utf-8", errors="replace"), stderr=stderr,
        exit_code=result.exit_code, status=result.status, duration_ms=result.duration_ms, language=language,
        truncated=result.truncated, runtime_session_id=session_id, runtime_status="new",
    ).model_dump()  # fmt: skip


@blueprint.post("/exec")
@documented(
    "Run code in a sandbox",
    tag="exec",
    body=ExecRequest,
    response=ExecResponse,
    errors={400: "Unsupported language or empty code", 413: "Body too large", 422: "Malformed body",
            503: "Too many runs queued (Retry-After)"},
    description="Answers 200 whatever the program does (exit_code and status tell). Replies that take over "
    "3 s start with whitespace keepalives.",
)  # fmt: skip
async def exec_code() -> Response | dict[str, Any]:
    body = await json_body(ExecRequest)
    job = build_job(body)
    deps = _deps()
    principal = current_principal()
    session_id = new_request_id()  # a 21-character nanoid, like the reference's sessions
    language = job.language.code
    handle = deps.executor.submit(job)  # 503 here, before any byte of the reply
    finished = False
    try:
        if await wait_or_timeout(handle, KEEPALIVE_AFTER_S):
            result = await handle.wait()
            finished = True
            _log_run(result, language, principal.id)
            return render(result, language, session_id)
        finished = True  # the stream below owns the handle from here
    finally:
        if not finished:
            handle.cancel()  # the client went away while we waited
    return Response(
        _keepalive_stream(handle, language, session_id, principal.id), status=200, content_type="application/json"
    )


async def _keepalive_stream(
    handle: RunHandle, language: str, session_id: str, principal_id: str
) -> AsyncIterator[bytes]:
    try:
        yield b" "
        while not await wait_or_timeout(handle, KEEPALIVE_EVERY_S):
            yield b" "
        try:
            result = await handle.wait()
        except InterpreterError as exc:
            yield json.dumps(envelope(exc.status, str(exc), request_id=None, error_type=exc.error_type)).encode()
            return
        except Exception:
            log.exception("run failed after keepalives started")
            failure = ServiceUnavailable("Unexpected error during code execution")
            yield json.dumps(envelope(503, str(failure), request_id=None)).encode()
            return
        _log_run(result, language, principal_id)
        yield json.dumps(render(result, language, session_id)).encode()
    finally:
        handle.cancel()  # a no-op once done; cancels the run when the client disconnected


def _log_run(result: RunResult, language: str, principal_id: str) -> None:
    log.info(
        "run finished",
        extra={"fields": {"language": language, "status": result.status, "exit_code": result.exit_code,
                          "duration_ms": result.duration_ms, "principal": principal_id}},
    )  # fmt: skip
