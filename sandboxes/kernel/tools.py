"""Programmatic tool calling inside the kernel: a cell that can ask the host to call the agent's tools.

A round is one TOOL_CALL frame (``{"calls": [{"name", "input"}]}``) answered by one TOOL_RESULT
frame (``{"results": [{"ok", "value", "error"}]}``, in the same order); the host pairs them with
the client's call ids. The kernel blocks while the host is paused, which costs nothing.

- **Python**: each tool is an ``async`` stub bound in the user's namespace for the cell only.
  Calls made together (``asyncio.gather``) leave in one round: the first call waits until every
  task that is ready to run has had its turn, then sends all the calls collected so far.
- **bash**: each tool is a shell function taking one JSON argument and printing the JSON result
  on a line (``{"error": ...}`` and status 1 when the tool failed); calls are sequential. The
  functions write the call to a FIFO in the cell's private directory under ``/tmp`` and read the
  answer from another.

Standard library only (this file runs in the jail).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import protocol

MAX_SPINS = 1000  # loop iterations a round waits for other ready tasks to make their calls
RUN_DIR = "/mnt/data"
_MISSING = object()


class ToolError(RuntimeError):
    """A tool call the client reported as failed (``is_error``); user code may catch it."""


ToolError.__module__ = "builtins"  # tracebacks say ToolError, not tools.ToolError


class Bridge:
    """The tool rounds of one cell."""

    def __init__(self, send: Callable[..., None], results: Any, tools: list[dict[str, Any]]) -> None:
        self.send, self.results, self.tools = send, results, tools
        self.pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        while not results.empty():  # a stray answer (forged by an earlier cell) is not this cell's
            results.get_nowait()

    def round(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send calls, block until their results come back (in the same order)."""
        self.send(protocol.TOOL_CALL, {"calls": calls})
        header, _ = self.results.get()
        results = header.get("results")
        if not isinstance(results, list) or len(results) != len(calls):
            raise ToolError("the host answered the tool calls incorrectly")
        return results

    # --- Python ------------------------------------------------------------------------------------

    def bind(self, namespace: dict[str, Any]) -> Callable[[], None]:
        """Bind the stubs in ``namespace``; returns what unbinds them (names the user rebound stay)."""
        shadowed = {}
        stubs = {}
        for tool in self.tools:
            stub = self._stub(str(tool["name"]), str(tool["bind"]), str(tool.get("description") or ""))
            shadowed[stub.__name__] = namespace.get(stub.__name__, _MISSING)
            stubs[stub.__name__] = namespace[stub.__name__] = stub

        def unbind() -> None:
            for name, stub in stubs.items():
                if namespace.get(name) is stub:
                    if shadowed[name] is _MISSING:
                        del namespace[name]
                    else:
                        namespace[name] = shadowed[name]

        return unbind

    def _stub(self, name: str, bind: str, description: str) -> Callable[..., Any]:
        bridge = self

        async def stub(*args: Any, **kwargs: Any) -> Any:
            if args:
                if len(args) != 1 or not isinstance(args[0], dict) or kwargs:
                    raise TypeError(f"{bind}() takes keyword arguments (or one dict)")
                kwargs = args[0]
            call = {"name": name, "input": json.loads(json.dumps(kwargs, default=_plain))}
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            bridge.pending.append((call, future))
            if len(bridge.pending) == 1:
                loop.call_soon(bridge._flush, loop, 0)
            return await future

        stub.__name__ = stub.__qualname__ = bind
        stub.__doc__ = description or None
        return stub

    def _flush(self, loop: asyncio.AbstractEventLoop, spins: int) -> None:
        # Tasks still waiting for their turn may be about to call a tool too: let them first.
        if getattr(loop, "_ready", None) and spins < MAX_SPINS:
            loop.call_soon(self._flush, loop, spins + 1)
            return
        batch, self.pending = self.pending, []
        batch = [(call, future) for call, future in batch if not future.done()]  # cancelled meanwhile
        if not batch:
            return
        try:
            results = self.round([call for call, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each waiting call gets the failure
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not isinstance(result, dict):
                future.set_exception(ToolError("the host answered the tool call incorrectly"))
            elif result.get("ok"):
                future.set_result(result.get("value"))
            else:
                future.set_exception(ToolError(str(result.get("error") or "Tool call failed")))

    # --- bash --------------------------------------------------------------------------------------

    def run_bash(self, code: str, args: list[str]) -> int:
        """Run ``code`` with bash, answering its tool calls; returns bash's exit status."""
        with tempfile.TemporaryDirectory(prefix="tools-", dir="/tmp") as directory:
            call_path, result_path = os.path.join(directory, "call"), os.path.join(directory, "result")
            os.mkfifo(call_path, 0o600)
            os.mkfifo(result_path, 0o600)
            functions = os.path.join(directory, "tools.sh")
            with open(functions, "w", encoding="utf-8") as file:
                file.write(bash_functions(self.tools, call_path, result_path))
            script = os.path.join(directory, "code.sh")
            with open(script, "w", encoding="utf-8") as file:
                file.write(code)
            # O_RDWR: opening never waits for a writer, and reads never see EOF between calls.
            calls = os.open(call_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            env = {**os.environ, "BASH_ENV": functions}
            process = subprocess.Popen(["bash", script, *args], cwd=RUN_DIR, env=env, start_new_session=True)
            try:
                return self._serve_bash(process, calls, result_path)
            except KeyboardInterrupt:
                return 130
            finally:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                os.close(calls)

    def _serve_bash(self, process: subprocess.Popen[bytes], calls: int, result_path: str) -> int:
        exited = os.pidfd_open(process.pid)
        buffered = b""
        try:
            while True:
                ready, _, _ = select.select([calls, exited], [], [])
                if calls in ready:
                    with contextlib.suppress(BlockingIOError):
                        buffered += os.read(calls, 65536)
                    while buffered.count(b"\0") >= 2:
                        name, argument, buffered = buffered.split(b"\0", 2)
                        self._answer_bash(process, name.decode(errors="replace"), argument, result_path)
                if exited in ready:
                    return process.wait()
        finally:
            os.close(exited)

    def _answer_bash(self, process: subprocess.Popen[bytes], name: str, argument: bytes, result_path: str) -> None:
        text = argument.decode(errors="replace")
        try:
            value = json.loads(text) if text.strip() else {}
        except ValueError:
            value = text  # not JSON: the tool gets the string itself
        (result,) = self.round([{"name": name, "input": value}])
        ok = isinstance(result, dict) and bool(result.get("ok"))
        if ok:
            line = json.dumps(result.get("value"))
        else:
            error = result.get("error") if isinstance(result, dict) else None
            line = json.dumps({"error": str(error or "Tool call failed")})
        answer = f"{0 if ok else 1}\n{line}\n".encode()
        while True:  # the function opens the result FIFO right after writing its call
            try:
                fd = os.open(result_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or process.poll() is not None:
                    return
                time.sleep(0.001)
        try:
            os.set_blocking(fd, True)
            os.write(fd, answer)
        except OSError:
            pass  # the caller went away (killed mid-call)
        finally:
            os.close(fd)


def bash_functions(tools: list[dict[str, Any]], call_path: str, result_path: str) -> str:
    """The shell functions of ``tools`` (sourced through BASH_ENV, so subshells have them too)."""
    lines = [
        "__tool_call() {",
        "  local __status",
        f'  printf \'%s\\0%s\\0\' "$1" "${{2-}}" > {shlex.quote(call_path)} || return 1',
        f"  {{ IFS= read -r __status; cat; }} < {shlex.quote(result_path)}",
        '  return "${__status:-1}"',
        "}",
    ]
    for tool in tools:
        lines.append(f'{tool["bind"]}() {{ __tool_call {shlex.quote(str(tool["name"]))} "$@"; }}')
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """JSON for what json cannot encode itself: numpy scalars and arrays, sets; otherwise the text."""
    for method in ("item", "tolist"):
        if callable(getattr(value, method, None)):
            with contextlib.suppress(Exception):
                return getattr(value, method)()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
