"""Live runs: ``GET /ws/exec`` (WebSocket, with stdin and cancel) and ``POST /exec/stream`` (server-sent events).

Both stream the same events (DESIGN §7): ``started``, then ``stdout``/``stderr`` as the program
writes, then exactly one ``result`` equal to what ``/exec`` returns (or one ``error``). Output is
relayed from the run as it arrives; a client that reads slowly holds at most the run's own output
(each stream is capped at MAX_OUTPUT_MB, past which the run is stopped and marked truncated), and
large bursts are coalesced into frames of at most FRAME_CHARS characters.

WebSocket protocol: the client's first message is a JSON object shaped like the ``/exec`` body; then it
may send ``{"type":"stdin","data":...}``, ``{"type":"stdin_eof"}`` and ``{"type":"cancel"}``. A malformed
or out-of-order message gets an ``error`` event and close 1008 (a binary one 1003); a disconnect cancels
the run; server shutdown stops the run and closes with 1001. Keys may also come as ``?api_key=`` or as a
``key.<key>`` subprotocol (browsers cannot set headers); offer ``interpreter`` too, which is the one accepted.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import trio
from pydantic import ValidationError
from quart import Blueprint, Response, websocket

from interpreter.api.app import auth_failed, client_ip, current_deps, current_principal, user_principal
from interpreter.api.bodies import json_body, validation_details
from interpreter.api.envelope import envelope
from interpreter.api.execute import ExecRequest, RunContext, log_run, render, start_run
from interpreter.api.openapi import documented
from interpreter.auth.principals import Principal
from interpreter.errors import InterpreterError, ServiceUnavailable
from interpreter.execution.executor import RunHandle
from interpreter.execution.runner import RunResult

log = logging.getLogger("interpreter.stream")
blueprint = Blueprint("stream", __name__)

FRAME_CHARS = 64 * 1024
FIRST_MESSAGE_TIMEOUT_S = 30
SSE_KEEPALIVE_S = 15
SUBPROTOCOL = "interpreter"
KEY_SUBPROTOCOL = "key."
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_TRY_LATER = 1000, 1001, 1003, 1008, 1013


class OutputRelay:
    """A run's output between the runner and one client: appended as it arrives, taken as the client can."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, bytearray]] = []
        self.arrived = trio.Event()

    async def on_output(self, stream: str, data: bytes) -> None:
        if self.pending and self.pending[-1][0] == stream:
            self.pending[-1][1].extend(data)  # coalesced: a burst becomes one frame, not thousands
        else:
            self.pending.append((stream, bytearray(data)))
        self.arrived.set()

    def take(self) -> list[tuple[str, bytearray]]:
        taken, self.pending = self.pending, []
        self.arrived = trio.Event()
        return taken


async def _first_of(*waits: Any) -> None:
    async with trio.open_nursery() as race:
        for wait in waits:

            async def one(wait: Any = wait) -> None:
                await wait()
                race.cancel_scope.cancel()

            race.start_soon(one)


async def run_events(handle: RunHandle[RunResult], context: RunContext, relay: OutputRelay,
                     keepalive_s: float | None = None) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
    """The events of one run, for any transport. With ``keepalive_s``, a ``keepalive`` event when idle that long."""
    session = context.resolved.session.id
    yield {"type": "started", "session_id": session, "runtime_session_id": session,
           "runtime_status": context.resolved.status, "language": context.language}  # fmt: skip
    decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")}
    while True:
        with trio.move_on_after(keepalive_s if keepalive_s is not None else float("inf")) as idle:
            await _first_of(relay.arrived.wait, handle.done.wait)
        if idle.cancelled_caught:
            yield {"type": "keepalive"}
        for stream, data in relay.take():
            text = decoders[stream].decode(bytes(data))
            for start in range(0, len(text), FRAME_CHARS):
                yield {"type": stream, "data": text[start : start + FRAME_CHARS]}
        if handle.done.is_set() and not relay.pending:
            break
    for stream, decoder in decoders.items():
        if tail := decoder.decode(b"", final=True):
            yield {"type": stream, "data": tail}
    try:
        result = await handle.wait()
    except InterpreterError as exc:
        yield {"type": "error", **envelope(exc.status, str(exc), request_id=None, error_type=exc.error_type)}
        return
    log_run(result, context)
    yield {"type": "result", **render(result, context)}


# --- server-sent events ---------------------------------------------------------------------------------


@blueprint.post("/exec/stream")
@documented(
    "Run code and stream its output as server-sent events",
    tag="exec",
    body=ExecRequest,
    errors={400: "Unsupported language or empty code", 422: "Malformed body", 503: "Too many runs queued"},
    description="text/event-stream: `started`, then `stdout`/`stderr` as they are written, then one `result` "
    "(the /exec reply) or `error`. Each event's data is JSON. Disconnecting cancels the run.",
)  # fmt: skip
async def exec_stream() -> Response:
    body = await json_body(ExecRequest)
    relay = OutputRelay()
    handle, context = await start_run(body, current_principal(), relay.on_output)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(_sse(handle, context, relay), status=200, content_type="text/event-stream", headers=headers)


async def _sse(handle: RunHandle[RunResult], context: RunContext, relay: OutputRelay) -> AsyncIterator[bytes]:
    try:
        async for event in run_events(handle, context, relay, keepalive_s=SSE_KEEPALIVE_S):
            if event["type"] == "keepalive":
                yield b": keepalive\n\n"  # a comment: keeps proxies from timing the stream out
            else:
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
    finally:
        handle.cancel()  # a no-op once the result exists; cancels the run when the client went away


# --- WebSocket ---------------------------------------------------------------------------------------------


async def _websocket_principal() -> Principal:
    """The same credentials as HTTP (managed keys and JWTs included), plus ``?api_key=`` and a
    ``key.<key>`` subprotocol for browsers, which cannot set headers on a WebSocket."""
    headers = websocket.headers.copy()
    if "x-api-key" not in headers and "authorization" not in headers:
        offered = [p for p in websocket.requested_subprotocols if p.startswith(KEY_SUBPROTOCOL)]
        key = websocket.args.get("api_key") or (offered[0][len(KEY_SUBPROTOCOL) :] if offered else None)
        if key:
            headers["x-api-key"] = key
    return await user_principal(current_deps(), headers)


@blueprint.websocket("/ws/exec")
async def ws_exec() -> Response | None:
    deps = current_deps()
    client = client_ip(deps, websocket)
    try:
        if deps.failures is not None:
            await deps.failures.check(client)
        try:
            principal = await _websocket_principal()
        except InterpreterError as exc:
            await auth_failed(deps, client, websocket.path, exc)
            raise
    except InterpreterError as exc:  # refused at the handshake, before anything is accepted
        body = envelope(exc.status, str(exc), request_id=None, error_type=exc.error_type)
        return Response(json.dumps(body), status=exc.status, content_type="application/json", headers=exc.headers)
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in websocket.requested_subprotocols else None
    await websocket.accept(subprotocol=subprotocol)
    await _WebSocketRun(principal).serve()
    return None


class _ClientError(Exception):
    def __init__(self, message: str, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(message)
        self.close_code = close_code


class _WebSocketRun:
    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.stdin_send, self.stdin_receive = trio.open_memory_channel[bytes | None](64)
        self.handle: RunHandle[RunResult] | None = None

    async def _send(self, event: dict[str, Any]) -> None:
        await websocket.send(json.dumps(event))

    async def _close_with_error(self, message: str, code: int, error_type: str = "validation",
                                details: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        with contextlib.suppress(Exception):  # the client may already be gone
            await self._send({"type": "error", "error": message, "error_type": error_type, "details": details})
            await websocket.close(code)

    async def _message(self) -> dict[str, Any]:
        raw = await websocket.receive()
        if isinstance(raw, bytes):
            raise _ClientError("Binary messages are not part of the protocol", CLOSE_UNSUPPORTED)
        try:
            message = json.loads(raw)
        except ValueError:
            raise _ClientError("A message is not JSON") from None
        if not isinstance(message, dict):
            raise _ClientError("A message must be a JSON object")
        return message

    async def serve(self) -> None:
        deps = current_deps()
        try:
            with trio.fail_after(FIRST_MESSAGE_TIMEOUT_S):
                first = await self._message()
            if "type" in first:
                raise _ClientError("The first message must be the run (an /exec body), not a control message")
            try:
                body = ExecRequest.model_validate(first)
            except ValidationError as exc:
                await self._close_with_error("Request validation failed", CLOSE_POLICY, details=validation_details(exc))
                return
            relay = OutputRelay()
            try:
                self.handle, context = await start_run(body, self.principal, relay.on_output, self.stdin_receive)
            except InterpreterError as exc:
                code = CLOSE_TRY_LATER if isinstance(exc, ServiceUnavailable) else CLOSE_POLICY
                await self._close_with_error(str(exc), code, exc.error_type, exc.details)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_client)
                nursery.start_soon(self._on_shutdown, deps.shutdown)
                async for event in run_events(self.handle, context, relay):
                    await self._send(event)
                nursery.cancel_scope.cancel()
            await websocket.close(CLOSE_NORMAL)
        except* trio.TooSlowError:
            await self._close_with_error("No run message arrived in time", CLOSE_POLICY)
        except* _ClientError as group:
            error = group.exceptions[0]
            assert isinstance(error, _ClientError)
            await self._close_with_error(str(error), error.close_code)
        except* _Cancelled:
            await self._close_with_error("The run was cancelled", CLOSE_NORMAL, "cancelled")
        except* _ShuttingDown:
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_GOING_AWAY)
        finally:
            if self.handle is not None:
                self.handle.cancel()  # a disconnect or an error stops the run and frees its jail at once

    async def _read_client(self) -> None:
        stdin_open = True
        while True:
            message = await self._message()
            kind = message.get("type")
            if kind == "stdin" and stdin_open and isinstance(message.get("data"), str):
                await self.stdin_send.send(message["data"].encode())
            elif kind == "stdin_eof" and stdin_open:
                stdin_open = False
                await self.stdin_send.send(None)
            elif kind == "cancel":
                assert self.handle is not None
                self.handle.cancel()
                raise _Cancelled("The run was cancelled")
            else:
                raise _ClientError(f"Unexpected message {str(kind)[:40]!r} (after stdin_eof, or unknown)")

    async def _on_shutdown(self, shutdown: trio.Event) -> None:
        await shutdown.wait()
        assert self.handle is not None
        self.handle.cancel()
        with trio.move_on_after(5):
            await self.handle.done.wait()
        raise _ShuttingDown


class _Cancelled(Exception):
    """The client asked to stop the run."""


class _ShuttingDown(Exception):
    """The server is stopping: the run was stopped, the socket closes with 1001."""
