"""The Python kernel: a long-lived interpreter inside a jail, driven over the framed protocol.

Started as ``python -E -s kernel.py <fd>`` with ``<fd>`` an already-open stream socket to the host
(nothing else is needed, so nsjail and a zygote can both start it), cwd ``/mnt/data``. Standard
library only at import; numpy, pandas, matplotlib and cloudpickle come from the sandbox venv.

Output is captured at the fd level: fds 1 and 2 are the jail's stdout and stderr, pipes the host
reads directly, so ``os.system``, subprocesses and C extensions are captured, and nothing written
is lost if this process dies. At the end of a run the kernel writes the run's marker (chosen by the
host) to both, so the host knows it has everything. Threads: the main thread runs user code (so
SIGINT interrupts it); one reads host frames; one feeds the user's stdin. The user's code runs in
this process and can break anything here: the host trusts nothing that comes from it.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import contextlib
import fcntl
import io
import linecache
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import types
from typing import Any

import protocol
import state
import tools

FILENAME = "<code>"
KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))  # frames from here are never the user's
RUN_DIR = "/mnt/data"
DEPS_PYTHON = "/opt/skill-deps/python"  # with the network on: the principal's package cache (PIP_TARGET)
HIGH_FD = 100
NEW_RUN = b"new run"  # a marker in the stdin queue (compared by identity)
PRELOADED = {"np": "numpy", "pd": "pandas", "plt": "matplotlib.pyplot"}
STDLIB_ALIASES = ("json", "os", "sys", "re", "math", "datetime", "collections", "itertools", "functools", "pathlib")
LAZY = {"sp": "scipy", "scipy": "scipy", "sm": "statsmodels.api", "nx": "networkx", "Image": "PIL.Image",
        "sklearn": "sklearn"}  # fmt: skip


class LazyModule(types.ModuleType):
    """A name bound to a module that is imported on first use (then it replaces itself)."""

    def __init__(self, alias: str, target: str, namespace: dict[str, Any]) -> None:
        super().__init__(target)
        self.__dict__["_lazy"] = (alias, target, namespace)

    def __getattr__(self, attribute: str) -> Any:
        alias, target, namespace = self.__dict__["_lazy"]
        import importlib

        module = importlib.import_module(target)
        if namespace.get(alias) is self:
            namespace[alias] = module
        return getattr(module, attribute)


class Kernel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.requests: queue.Queue[tuple[int, dict[str, Any], bytes]] = queue.Queue()
        self.stdin_queue: queue.Queue[bytes | None] = queue.Queue()
        self.stdin_pipes: queue.Queue[int] = queue.Queue()
        self.tool_results: queue.Queue[tuple[dict[str, Any], bytes]] = queue.Queue()
        self.main_thread = threading.get_ident()
        self.in_user_code = False
        self.namespace: dict[str, Any] = {}
        self.preloaded: dict[str, Any] = {}
        # Private copies of the jail's stdout and stderr, away from the low numbers user code plays with.
        self.stdout_fd = _high(os.dup(1))
        self.stderr_fd = _high(os.dup(2))

    # --- talking to the host -------------------------------------------------------------------------

    def send(self, kind: int, header: dict[str, Any] | None = None, payload: bytes = b"") -> None:
        frame = protocol.encode(kind, header, payload)
        try:
            with self.send_lock:
                self.sock.sendall(frame)
        except OSError:
            os._exit(0)  # the host is gone (or the user closed our socket): nothing left to serve

    def _receive_exactly(self, count: int) -> bytes:
        chunks = []
        while count:
            chunk = self.sock.recv(min(count, 1 << 20))
            if not chunk:
                os._exit(0)
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def receive_frames(self) -> None:
        """The host's frames: runs, checkpoints and restores go to the main thread; the rest is handled here."""
        while True:
            rest, kind, header_length = protocol.decode_prefix(self._receive_exactly(protocol.PREFIX.size), 1 << 31)
            header, payload = protocol.decode_body(self._receive_exactly(rest), header_length)
            if kind in (protocol.RUN, protocol.CHECKPOINT, protocol.RESTORE):
                if kind == protocol.RUN:  # STDIN frames after this one belong to this run
                    self.stdin_queue.put(NEW_RUN)
                    if payload:  # the run's stdin may come with it, and its end too
                        self.stdin_queue.put(payload)
                    if header.get("stdin_eof"):
                        self.stdin_queue.put(None)
                self.requests.put((kind, header, payload))
            elif kind == protocol.STDIN:
                self.stdin_queue.put(payload)
            elif kind == protocol.STDIN_EOF:
                self.stdin_queue.put(None)
            elif kind == protocol.INTERRUPT:
                if self.in_user_code:
                    signal.pthread_kill(self.main_thread, signal.SIGINT)
            elif kind == protocol.TOOL_RESULT:
                self.tool_results.put((header, payload))

    def feed_stdin(self) -> None:
        """Writes the host's stdin to the current run's pipe (a separate thread: a full pipe must not block frames)."""
        target: int | None = None
        while True:
            data = self.stdin_queue.get()
            if data is NEW_RUN:  # the main thread hands over the new run's pipe
                if target is not None:
                    _close(target)
                target = self.stdin_pipes.get()
                continue
            if target is None:
                continue
            if data is None:
                _close(target)
                target = None
                continue
            try:
                os.write(target, data)
            except OSError:
                _close(target)
                target = None

    # --- the user's environment ----------------------------------------------------------------------

    def prepare_namespace(self) -> None:
        os.environ.setdefault("MPLBACKEND", "Agg")
        os.environ.setdefault("MPLCONFIGDIR", "/tmp/.mpl")
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        namespace = main.__dict__
        namespace["__builtins__"] = builtins
        for alias in STDLIB_ALIASES:
            namespace[alias] = __import__(alias)
        for alias, module in PRELOADED.items():
            try:
                namespace[alias] = _import(module)
            except Exception:  # noqa: BLE001 - a venv without it: the alias is simply missing
                continue
        plt = namespace.get("plt")
        if plt is not None:
            plt.show = lambda *args, **kwargs: save_figures()
        for alias, module in LAZY.items():
            namespace[alias] = LazyModule(alias, module, namespace)
        if RUN_DIR not in sys.path:
            sys.path.insert(0, RUN_DIR)
        if os.path.isdir(DEPS_PYTHON) and DEPS_PYTHON not in sys.path:
            sys.path.append(DEPS_PYTHON)  # what the principal pip-installed; after the preinstalled stack
        self.namespace = namespace
        self.preloaded = dict(namespace)

    def reset_stdio(self, stdin_read: int) -> None:
        """Fresh fds 0-2 and sys.std* for each run, whatever the last run did to them."""
        os.dup2(stdin_read, 0)
        os.close(stdin_read)
        os.dup2(self.stdout_fd, 1)
        os.dup2(self.stderr_fd, 2)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", write_through=True)  # fmt: skip
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", write_through=True)  # fmt: skip

    # --- requests ------------------------------------------------------------------------------------

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        self.send(protocol.READY, {"pid": os.getpid()})
        while True:
            kind, header, payload = self.requests.get()
            if kind == protocol.RUN:
                self.run(header)
            elif kind == protocol.CHECKPOINT:
                blob, warnings, count = state.capture(self.namespace, self.preloaded, LazyModule)
                limit = int(header.get("max_bytes", 0)) or len(blob)
                if len(blob) > limit:
                    warnings.append(f"the variables take {len(blob)} bytes saved, over the limit of {limit}: not saved")
                    blob = b""
                self.send(protocol.STATE, {"warnings": warnings, "saved": bool(blob), "variables": count}, blob)
            elif kind == protocol.RESTORE:
                warnings = state.restore(self.namespace, payload)
                self.send(protocol.RESULT, {"status": "ok", "exit_code": 0, "warnings": warnings})

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.in_user_code:  # a late interrupt must not hit the kernel's own code
            raise KeyboardInterrupt

    def run(self, header: dict[str, Any]) -> None:
        stdin_read, stdin_write = (_high(fd) for fd in os.pipe())  # never on 0-2, which the user may have closed
        self.stdin_pipes.put(stdin_write)
        self.reset_stdio(stdin_read)
        sys.argv = ["code.py", *[str(arg) for arg in header.get("args", [])]]
        with contextlib.suppress(OSError):
            os.chdir(RUN_DIR)
        signal.signal(signal.SIGINT, self._on_sigint)
        self.send(protocol.STARTED)
        started = time.monotonic()
        code = str(header.get("code", ""))
        bridge = tools.Bridge(self.send, self.tool_results, header["tools"]) if header.get("tools") else None
        if header.get("lang") == "bash":
            exit_code, error = self.run_bash(code, sys.argv[1:], bridge)
        else:
            exit_code, error = execute(self, code, bridge)
        # A broken figure or a closed stream is the user's business; the run's result still goes back.
        with contextlib.suppress(Exception):
            save_figures()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        stop_strays()
        marker = str(header.get("marker", "")).encode()
        for fd in (self.stdout_fd, self.stderr_fd):
            with contextlib.suppress(OSError):
                os.write(fd, marker)
        duration_ms = int((time.monotonic() - started) * 1000)
        self.send(protocol.RESULT, {"exit_code": exit_code, "status": "ok" if exit_code == 0 else "error",
                                    "error": error, "duration_ms": duration_ms})  # fmt: skip

    def run_bash(self, code: str, args: list[str], bridge: tools.Bridge | None) -> tuple[int, str | None]:
        """A bash cell (programmatic tool calling): bash runs beside the kernel, the namespace is untouched."""
        bridge = bridge or tools.Bridge(self.send, self.tool_results, [])
        self.in_user_code = True
        try:
            exit_code = bridge.run_bash(code, args)
        finally:
            self.in_user_code = False
        return exit_code, None if exit_code == 0 else f"bash exited with code {exit_code}"


def execute(kernel: Kernel, code: str, bridge: tools.Bridge | None = None) -> tuple[int, str | None]:
    """Run one cell in the user's namespace: (exit code, a one-line summary of the error if it failed).

    A traceback goes to stderr. With ``bridge``, the tools are bound for this cell only.
    """
    namespace = kernel.namespace
    linecache.cache[FILENAME] = (len(code), None, code.splitlines(keepends=True), FILENAME)
    unbind = bridge.bind(namespace) if bridge is not None else None
    try:
        kernel.in_user_code = True
        try:
            tree = ast.parse(code, filename=FILENAME, mode="exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            _evaluate(compile(tree, FILENAME, "exec", flags=flags), namespace)
            if last is not None:
                expression = ast.Expression(last.value)
                value = _evaluate(compile(expression, FILENAME, "eval", flags=flags), namespace)
                if value is not None:
                    sys.displayhook(value)
        finally:
            kernel.in_user_code = False
            if unbind is not None:
                unbind()
    except SystemExit as exc:
        status = _exit_status(exc)
        return status, None if status == 0 else f"SystemExit: {exc.code}"
    except BaseException as exc:  # noqa: BLE001 - whatever user code raises is reported, never fatal
        _print_user_traceback(exc)
        return 1, _summary(exc)
    return 0, None


def _summary(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1][:1000]
    except Exception:  # noqa: BLE001 - a broken __str__
        return type(exc).__name__


def _evaluate(code: types.CodeType, namespace: dict[str, Any]) -> Any:
    if code.co_flags & 0x80:  # CO_COROUTINE: top-level await; only then is an event loop running
        return asyncio.run(eval(code, namespace))
    return eval(code, namespace)


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback without the kernel's own frames (where user code is called, the SIGINT handler)."""
    try:
        summary = traceback.TracebackException.from_exception(exc)
        summary.stack = traceback.StackSummary.from_list(
            [f for f in summary.stack if os.path.dirname(f.filename) != KERNEL_DIR]
        )
        sys.stderr.write("".join(summary.format()))
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - stderr closed by the user, or a broken __str__
        pass


def save_figures() -> None:
    """Open matplotlib figures become PNG files in /mnt/data (left open, or shown with plt.show())."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        path = _next_free(os.path.join(RUN_DIR, "figure-{}.png"))
        figure.savefig(path, format="png")
    pyplot.close("all")


def _next_free(pattern: str) -> str:
    """The first of pattern.format(1), (2), ... that does not exist: figures never overwrite earlier files."""
    number = 1
    while os.path.lexists(pattern.format(number)):
        number += 1
    return pattern.format(number)


def stop_strays() -> None:
    """Processes a run started die with it, as in a one-shot run: background jobs do not outlive the cell.

    Everything in the jail's PID namespace but its init (the shell, pid 1) and this kernel is killed,
    double-forked daemons included; the kernel reaps its own children.
    """
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (1, me):
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _import(name: str) -> Any:
    module = __import__(name)
    for part in name.split(".")[1:]:
        module = getattr(module, part)
    return module


def _high(fd: int) -> int:
    """``fd`` moved to a number >= HIGH_FD, close-on-exec."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    os.close(fd)
    return moved


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def serve_on(fd: int) -> None:
    """Serve the host on the stream socket ``fd`` until it goes away (nsjail's kernels and the zygote's)."""
    kernel = Kernel(socket.socket(fileno=_high(fd)))
    kernel.prepare_namespace()
    for target in (kernel.receive_frames, kernel.feed_stdin):
        threading.Thread(target=target, daemon=True).start()
    kernel.serve()


def main() -> None:
    serve_on(int(sys.argv[1]))


if __name__ == "__main__":
    main()
