"""``POST /exec/programmatic``: code that calls the agent's tools, paused between rounds (reference §6).

Every reply carries the reference's eight keys (nulls included). A problem with a continuation
token, a round limit or the code itself is ``200 {"status": "error"}`` as the clients expect;
only a malformed request, auth or a full server is an HTTP error. The run itself is in
``execution/programmatic.py``.
"""

from __future__ import annotations

import keyword
import logging
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response, request

from interpreter.api.app import AppDeps, current_deps, current_principal
from interpreter.api.bodies import json_body
from interpreter.api.execute import EntityId, FileRef, count_run, file_limits, reply_with_keepalives
from interpreter.api.openapi import documented
from interpreter.errors import BadRequest, ServiceUnavailable
from interpreter.execution.executor import clamp_timeout_s
from interpreter.execution.programmatic import INVALID_TOKEN, Program, Programmatic, Reply, Tool, failed
from interpreter.execution.python import PythonOutcome
from interpreter.execution.sessions import resolve_session
from interpreter.execution.workspace import plan_workspace
from interpreter.metrics import Metrics

log = logging.getLogger("interpreter.ptc")
blueprint = Blueprint("programmatic", __name__)

LANGS = ("bash", "py")
REQUEST_ID_HEADER = "X-LibreChat-Code-Request-ID"
WORKSPACE_HEADER = "X-LibreChat-Code-Workspace-ID"
BASH_RESERVED = frozenset({
    "if", "then", "else", "elif", "fi", "case", "esac", "for", "while", "until", "do", "done", "in", "function",
    "select", "time", "coproc", "declare", "typeset", "local", "readonly", "export", "unset",
})  # fmt: skip


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # LibreChat's LCTool carries more
    name: str = Field(min_length=1, max_length=256)
    description: str | None = ""
    parameters: dict[str, Any] | None = None


class ToolResult(BaseModel):
    model_config = ConfigDict(extra="ignore")
    call_id: str = Field(max_length=256)
    result: Any = None
    is_error: bool = False
    error_message: str | None = None


class ProgrammaticRequest(BaseModel):
    """A new run (``code``) or a continuation (``continuation_token``); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    code: str | None = None
    lang: str = "py"
    tools: list[ToolSpec] = Field(default_factory=list, max_length=512)
    session_id: str | None = None
    runtime_session_hint: str | None = Field(None, max_length=512)
    user_id: str | None = Field(None, max_length=256)
    entity_id: EntityId = None
    timeout: int | None = Field(None, ge=1000, le=300_000, description="milliseconds, for the whole run")
    files: list[FileRef] = Field(default_factory=list)
    continuation_token: str | None = Field(None, max_length=256)
    tool_results: list[ToolResult] = Field(default_factory=list, max_length=1000)

    @field_validator("lang")
    @classmethod
    def _lang(cls, value: str) -> str:
        lang = value.strip().lower()
        if lang not in LANGS:
            raise ValueError(f"lang must be one of {list(LANGS)}, got {value[:20]!r}")
        return lang


class ToolCall(BaseModel):
    id: str
    name: str
    input: Any


class ProgrammaticResponse(BaseModel):
    status: Literal["tool_call_required", "completed", "error"]
    session_id: str | None
    continuation_token: str | None
    tool_calls: list[ToolCall] | None
    stdout: str
    stderr: str
    files: list[dict[str, Any]]
    error: str | None


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str | None = Field(None, max_length=256)


def bind_name(name: str, lang: str) -> str:
    """The name code calls a tool by, as the clients expect: ``-``, whitespace (and for bash ``.``) become
    ``_``, other characters go, a leading digit gets ``_``, a keyword (bash: reserved word) gets ``_tool``."""
    separators = r"[-\s.]" if lang == "bash" else r"[-\s]"
    bound = re.sub(r"[^A-Za-z0-9_]", "", re.sub(separators, "_", name))
    if not bound:
        return "_unnamed"
    if bound[0].isdigit():
        bound = "_" + bound
    reserved = bound in BASH_RESERVED if lang == "bash" else keyword.iskeyword(bound)
    return bound + "_tool" if reserved else bound


def tools_of(specs: list[ToolSpec], lang: str) -> list[Tool]:
    """The request's tools with their bound names.

    Raises:
        BadRequest: two tools would be called by the same name.
    """
    tools: list[Tool] = []
    seen: dict[str, str] = {}
    for spec in specs:
        bind = bind_name(spec.name, lang)
        if bind in seen and seen[bind] != spec.name:
            raise BadRequest(
                f"Tools '{seen[bind][:60]}' and '{spec.name[:60]}' would both be called {bind}",
                details=[{"field": "tools", "message": "tool names collide", "code": "tool_name_collision"}],
            )
        if bind not in seen:
            seen[bind] = spec.name
            tools.append(Tool(spec.name, bind, (spec.description or "")[:2000]))
    return tools


def render(reply: Reply) -> dict[str, Any]:
    stdout = stderr = ""
    if reply.result is not None:
        stdout = reply.result.stdout.decode("utf-8", errors="replace")
        stderr = reply.result.stderr.decode("utf-8", errors="replace")
    if reply.notes:
        stderr += ("" if not stderr or stderr.endswith("\n") else "\n") + "\n".join(reply.notes) + "\n"
    calls = [ToolCall(**call) for call in reply.calls] if reply.status == "tool_call_required" else None
    return ProgrammaticResponse(
        status=reply.status, session_id=reply.session_id, continuation_token=reply.token, tool_calls=calls,
        stdout=stdout, stderr=stderr, files=reply.files, error=reply.error,
    ).model_dump()  # fmt: skip


def _engine(deps: AppDeps) -> Programmatic:
    if deps.programmatic is None:
        raise ServiceUnavailable("Programmatic tool calling needs the Python sandbox, which is not available")
    return deps.programmatic


def finisher(metrics: Metrics, principal_id: str) -> Callable[[Reply], dict[str, Any]]:
    def finish(reply: Reply) -> dict[str, Any]:
        if reply.result is not None:
            count_run(metrics, reply.lang, reply.result)
        log.info(
            "programmatic round finished",
            extra={"fields": {"status": reply.status, "language": reply.lang, "principal": principal_id,
                              "session": reply.session_id, "calls": len(reply.calls)}},
        )  # fmt: skip
        return render(reply)

    return finish


@blueprint.post("/exec/programmatic")
@documented(
    "Run code that calls the agent's tools",
    tag="exec",
    body=ProgrammaticRequest,
    response=ProgrammaticResponse,
    errors={400: "Tool names collide", 413: "Body too large", 422: "Malformed body", 503: "Too many runs queued"},
    description="Replies tool_call_required (with continuation_token and tool_calls) until the code finishes: "
    "completed or error. Post the tools' results with the token to continue; any server can continue any run.",
)  # fmt: skip
async def programmatic() -> Response | dict[str, Any]:
    body = await json_body(ProgrammaticRequest)
    deps, principal = current_deps(), current_principal()
    engine = _engine(deps)
    request_id = (request.headers.get(REQUEST_ID_HEADER) or "")[:256] or None
    finish = finisher(deps.metrics, principal.id)
    if body.continuation_token is not None:
        if not body.continuation_token:
            return render(failed(INVALID_TOKEN))
        results = [result.model_dump() for result in body.tool_results]
        work = engine.resume(principal.storage_prefix, body.continuation_token, results, request_id)
        return await reply_with_keepalives(deps.executor.submit(work), finish)
    if not body.code or not body.code.strip():
        return render(failed("Either 'code' or 'continuation_token' must be provided"))
    tools = tools_of(body.tools, body.lang)
    refs = [file.ref for file in body.files]
    hint = body.runtime_session_hint or (request.headers.get(WORKSPACE_HEADER) or "")[:512] or None
    resolved = await resolve_session(
        deps.catalog, principal.storage_prefix, user_id=body.user_id, session_id=body.session_id, hint=hint,
        file_session_ids=[ref.session_id for ref in refs], entity_id=body.entity_id,
    )  # fmt: skip
    workspace = await plan_workspace(deps.catalog, resolved.session, refs, file_limits(deps.settings))
    program = Program(
        lang=body.lang, code=body.code, tools=tools, refs=refs, request_id=request_id,
        timeout_s=clamp_timeout_s(body.timeout, deps.settings.max_execution_time_s),
    )  # fmt: skip
    work = engine.start(program, resolved.session, resolved.status == "reused", workspace, PythonOutcome())
    return await reply_with_keepalives(deps.executor.submit(work), finish)


@blueprint.post("/exec/programmatic/cancel")
@documented(
    "Stop a programmatic run",
    tag="exec",
    body=CancelRequest,
    errors={400: "No request id", 422: "Malformed body"},
    description=f"Names the run by the {REQUEST_ID_HEADER} its requests carried (in the body's request_id or "
    "that header). A paused run ends at once; a running one stops where it is.",
)  # fmt: skip
async def cancel() -> dict[str, Any]:
    body = await json_body(CancelRequest)
    request_id = body.request_id or (request.headers.get(REQUEST_ID_HEADER) or "")[:256]
    if not request_id:
        raise BadRequest(
            "A request_id is needed",
            details=[{"field": "request_id", "message": "give request_id or the header", "code": "missing"}],
        )
    cancelled = await _engine(current_deps()).cancel(current_principal().storage_prefix, request_id)
    return {"request_id": request_id, "cancelled": cancelled}
