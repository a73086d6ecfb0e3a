"""``POST /exec``: run code, answer with its output, a status and an exit code.

A reply not ready after ~3 s is sent as ``200 application/json`` with whitespace keepalives
until the JSON (Node clients drop sockets idle for 5 s); a failure after the first keepalive is
the error envelope inside that 200 body.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

import trio
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from quart import Blueprint, Response

from interpreter.api.app import current_deps, current_principal
from interpreter.api.bodies import json_body
from interpreter.api.envelope import envelope
from interpreter.api.openapi import documented
from interpreter.auth.principals import Principal
from interpreter.errors import BadRequest, InterpreterError, ServiceUnavailable
from interpreter.execution.executor import RunHandle, Work, clamp_timeout_s, wait_or_timeout
from interpreter.execution.python import PythonOutcome
from interpreter.execution.runner import Job, OnOutput, RunResult
from interpreter.execution.sessions import Resolved, resolve_session
from interpreter.execution.workspace import FileLimits, Ref, Workspace, plan_workspace
from interpreter.metrics import Metrics
from interpreter.settings import Settings

log = logging.getLogger("interpreter.exec")
blueprint = Blueprint("exec", __name__)

T = TypeVar("T")
KEEPALIVE_AFTER_S = 3.0
KEEPALIVE_EVERY_S = 3.0
ENTITY_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def _entity_id(value: str | None) -> str | None:
    if value is not None and not ENTITY_ID.match(value):
        raise ValueError("entity_id must be 1-40 characters of letters, digits, _ and -")
    return value


EntityId = Annotated[str | None, AfterValidator(_entity_id)]


class FileRef(BaseModel):
    """Either client generation's shape: ``{id, session_id, name}`` or ``{id, storage_session_id, name, ...}``."""

    model_config = ConfigDict(extra="allow")
    id: str
    name: str
    session_id: str | None = None
    storage_session_id: str | None = None

    @model_validator(mode="after")
    def _has_session(self) -> FileRef:
        if not (self.storage_session_id or self.session_id):
            raise ValueError("a file reference needs session_id or storage_session_id")
        return self

    @property
    def ref(self) -> Ref:
        return Ref(session_id=self.storage_session_id or self.session_id or "", file_id=self.id, name=self.name)


class ExecRequest(BaseModel):
    """The reference's request; unknown fields are ignored (LibreChat sends extra ones)."""

    model_config = ConfigDict(extra="ignore")
    code: str
    lang: str
    args: Any = None
    stdin: str | None = Field(None, description="Given to the program on its standard input")
    session_id: str | None = None
    runtime_session_hint: str | None = Field(None, max_length=512, description="An opaque host key of a session")
    files: list[FileRef] = Field(default_factory=list)
    user_id: str | None = Field(None, max_length=256)
    entity_id: EntityId = None
    timeout: int | None = Field(None, ge=1000, le=300_000, description="milliseconds")


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
    deleted_files: list[str] = Field(default_factory=list, description="Mounted files the run deleted")
    state_warnings: list[str] = Field(default_factory=list, description="Python variables that could not be saved")


def normalize_args(value: Any) -> tuple[str, ...]:
    """The reference's rules: null → none; a string → [s] unless blank; a list → its non-blank items as text."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list):
        return tuple(str(item) for item in value if item is not None and str(item).strip())
    return (str(value),)


def build_job(body: ExecRequest) -> Job:
    deps = current_deps()
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


def file_limits(settings: Settings) -> FileLimits:
    return FileLimits(
        max_file_bytes=settings.max_file_size_mib * 1024 * 1024,
        max_output_files=settings.max_output_files,
        max_files_per_session=settings.max_files_per_session,
        max_name_bytes=settings.max_filename_length,
    )


@dataclass(frozen=True)
class RunContext:
    language: str
    python: PythonOutcome | None
    metrics: Metrics
    resolved: Resolved
    workspace: Workspace
    principal_id: str


def render(result: RunResult, context: RunContext) -> dict[str, Any]:
    stderr = result.stderr.decode("utf-8", errors="replace")
    notes = [*result.notes, *context.workspace.notes]
    if notes:
        stderr += ("" if not stderr or stderr.endswith("\n") else "\n") + "\n".join(notes) + "\n"
    session_id = context.resolved.session.id
    python = context.python
    return ExecResponse(
        session_id=session_id, files=context.workspace.files, stdout=result.stdout.decode("utf-8", errors="replace"),
        stderr=stderr, exit_code=result.exit_code, status=result.status, duration_ms=result.duration_ms,
        language=context.language, truncated=result.truncated, runtime_session_id=session_id,
        runtime_status="restored" if python is not None and python.restored else context.resolved.status,
        deleted_files=context.workspace.deleted, state_warnings=python.state_warnings if python is not None else [],
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
    handle, context = await start_run(body, current_principal())

    def finish(result: RunResult) -> dict[str, Any]:
        log_run(result, context)
        return render(result, context)

    return await reply_with_keepalives(handle, finish)


async def reply_with_keepalives(
    handle: RunHandle[T], finish: Callable[[T], dict[str, Any]]
) -> Response | dict[str, Any]:
    """The run's reply: at once when it is ready within ~3 s, else streamed behind whitespace keepalives."""
    finished = False
    try:
        if await wait_or_timeout(handle, KEEPALIVE_AFTER_S):
            result = await handle.wait()
            finished = True
            return finish(result)
        finished = True  # the stream below owns the handle from here
    finally:
        if not finished:
            handle.cancel()  # the client went away while we waited
    return Response(_keepalive_stream(handle, finish), status=200, content_type="application/json")


async def _keepalive_stream(handle: RunHandle[T], finish: Callable[[T], dict[str, Any]]) -> AsyncIterator[bytes]:
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
        yield json.dumps(finish(result)).encode()
    finally:
        handle.cancel()  # a no-op once done; cancels the run when the client disconnected


async def start_run(
    body: ExecRequest, principal: Principal, on_output: OnOutput | None = None,
    stdin_stream: trio.MemoryReceiveChannel[bytes | None] | None = None,
) -> tuple[RunHandle[RunResult], RunContext]:  # fmt: skip
    """Validate, find the session, plan its files and submit the run (for /exec and the streaming routes).

    Raises:
        BadRequest: unsupported language, empty code, bad args.
        QueueFull: no run slot and no room in the queue (503).
        StoreUnavailable: a store failed (503).
    """
    job = replace(build_job(body), stdin_stream=stdin_stream, owner=principal.storage_prefix)  # validated first
    deps = current_deps()
    refs = [file.ref for file in body.files]
    resolved = await resolve_session(
        deps.catalog, principal.storage_prefix, user_id=body.user_id, session_id=body.session_id,
        hint=body.runtime_session_hint, file_session_ids=[ref.session_id for ref in refs], entity_id=body.entity_id,
    )  # fmt: skip
    workspace = await plan_workspace(deps.catalog, resolved.session, refs, file_limits(deps.settings))
    context = RunContext(job.language.code, None, deps.metrics, resolved, workspace, principal.id)
    work: Work[RunResult]
    if job.language.code == "py" and deps.python is not None:
        context = replace(context, python=PythonOutcome())
        assert context.python is not None
        work = deps.python.work(job, resolved.session, resolved.status == "reused", workspace, context.python)
    else:
        work = partial(deps.executor.runner.steps, replace(job, files=workspace))
    return deps.executor.submit(work, on_output), context  # 503 here, before any byte of a reply


def count_run(metrics: Metrics, language: str, result: RunResult) -> None:
    metrics.runs.inc(language=language, status=result.status)
    metrics.run_seconds.observe(result.duration_ms / 1000, language=language)


def log_run(result: RunResult, context: RunContext) -> None:
    """The run's log line and metrics (called from streamed bodies too: no app context needed)."""
    count_run(context.metrics, context.language, result)
    log.info(
        "run finished",
        extra={"fields": {"language": context.language, "status": result.status, "exit_code": result.exit_code,
                          "duration_ms": result.duration_ms, "principal": context.principal_id,
                          "session": context.resolved.session.id, "files_out": len(context.workspace.files),
                          **({"egress": result.egress} if result.egress is not None else {})}},
    )  # fmt: skip
