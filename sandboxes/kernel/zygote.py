"""The zygote: one pre-imported Python per node that forks an isolated kernel for each new session.

Started by the host in a jail of its own as ``python -E -s zygote.py <control fd> <config JSON>``.
It imports the kernel and the scientific stack, compiles the seccomp filter, freezes its heap
(``gc.freeze()``: a child's garbage collection then never un-shares the inherited pages) and
serves the control socket (SOCK_SEQPACKET): each message is a slot number (4 bytes) with four
file descriptors (the kernel's stdout and stderr pipes, its protocol socket, and its run directory
as an ``open_tree`` mount), and a fifth with the network on (the principal's package cache, also a
mount). It parses nothing else, holds no secrets, and never touches a session's files or code.

Per request it forks a child as pid 1 of a new PID namespace. The child says hello on the protocol
socket (the host reads its pid from the socket's credentials and moves it into the kernel's cgroup),
isolates itself meanwhile (``isolation.isolate``: nothing of it is user-controlled, and it allocates
next to nothing), with the network on hands the host a socket listening on its own loopback (the
egress proxy serves it: ``interpreter/egress/netns.py``), waits for "go" (placed), then forks the
kernel as pid 2, which inherits the cgroup, and stays as its init: user code is never pid 1, and
when the kernel ends the namespace (and anything left in it) ends with it.

Rotation: after ``rotate_sessions`` children or ``rotate_s`` seconds the zygote re-executes itself
in place (fresh address-space layout and hash secret). It is the jail's pid 1, and exec keeps the
pid, so live kernels (its children) are not touched.
"""

from __future__ import annotations

import array
import gc
import json
import os
import select
import socket
import struct
import sys
import time
import traceback

import isolation

FDS_PER_REQUEST = (4, 5)  # stdout, stderr, protocol socket, run directory tree[, package cache tree]
HELLO, LISTENER, GO = b"h", b"l", b"g"
EXIT_SETUP_FAILED = 70


def warm_imports() -> None:
    """What every kernel would import anyway, once, here (shared copy-on-write by every child)."""
    import cloudpickle  # noqa: F401
    import kernel  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import numpy
    import pandas  # noqa: F401
    from matplotlib import font_manager

    font_manager.findfont("DejaVu Sans")  # loads the font list once, here
    numpy.random.seed(0)  # the legacy generator's first seeding builds its state (~10 ms); children reseed it
    warm_paths()


def warm_paths() -> None:
    """Go once through what every kernel does (parse, compile, run, checkpoint, frame), so the caches those
    build on first use are made here and shared, not made again in each child's private memory."""
    import ast

    import kernel
    import protocol
    import state

    tree = ast.parse("value = sum(range(3))\nvalue", mode="exec")
    namespace: dict = {}
    exec(compile(tree, "<code>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), namespace)
    state.capture({"value": namespace["value"]}, {}, kernel.LazyModule)
    frame = protocol.encode(protocol.RESULT, {"exit_code": 0}, b"")
    _, _, header_length = protocol.decode_prefix(frame[: protocol.PREFIX.size], len(frame))
    protocol.decode_body(frame[protocol.PREFIX.size :], header_length)


def receive(control: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(64, socket.CMSG_SPACE(max(FDS_PER_REQUEST) * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def reap() -> None:
    """Collect children that ended (sessions' inits; after a re-exec, the previous image's ones too)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def child(slot: int, fds: list[int], config: dict, program: bytes, keep_closed: list[int]) -> None:
    """In the forked child: hello, isolation, the kernel as pid 2. Never returns."""
    stdout_w, stderr_w, sock_fd, tree_fd, *deps = fds
    try:
        for fd in keep_closed:
            os.close(fd)
        hello = socket.socket(fileno=os.dup(sock_fd))
        hello.sendall(HELLO)  # the host places us in our cgroup meanwhile (an RCU wait on cgroup v1)
        limits = isolation.ChildLimits(**config["limits"])
        isolation.isolate(slot, tree_fd, limits, program, deps[0] if deps else -1)
        if limits.egress_port:
            with socket.create_server(("127.0.0.1", limits.egress_port), backlog=64) as listener:
                passed = array.array("i", [listener.fileno()])
                hello.sendmsg([LISTENER], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
        if hello.recv(1) != GO:  # not placed: no kernel, no user code
            os._exit(EXIT_SETUP_FAILED)
        hello.close()
        os.environ.clear()
        os.environ.update(config["env"])
        null = os.open("/dev/null", os.O_RDONLY)
        for fd, target in ((null, 0), (stdout_w, 1), (stderr_w, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.dup2(sock_fd, 3)  # (a no-op when it is 3 already; received fds are never 0-2)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    except BaseException:  # noqa: BLE001 - whatever failed, no user code runs; why goes to the zygote's log
        traceback.print_exc()
        os._exit(EXIT_SETUP_FAILED)
    kernel_pid = os.fork()
    if kernel_pid == 0:
        run_kernel(3)
    os.close(3)
    while True:  # the namespace's init: reap everything, end with the kernel
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == kernel_pid:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def run_kernel(sock_fd: int) -> None:
    try:
        import random

        import numpy

        random.seed()  # (Python reseeds at fork too; this makes it explicit)
        numpy.random.seed()  # the legacy global generator is not reseeded at fork
        import kernel

        kernel.serve_on(sock_fd)
    finally:
        os._exit(0)


def serve(control: socket.socket, config: dict, program: bytes) -> None:
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    started, served = time.monotonic(), 0
    control.sendall(b"ready")
    while True:
        reap()
        if served >= config["rotate_sessions"] or time.monotonic() - started > config["rotate_s"]:
            os.set_inheritable(control.fileno(), True)
            os.execv(sys.executable, [sys.executable, "-E", "-s", os.path.abspath(__file__),
                                      str(control.fileno()), sys.argv[2]])  # fmt: skip
        if not select.select([control], [], [], 1.0)[0]:
            continue
        message, fds = receive(control)
        if not message:
            os._exit(0)  # the host is gone
        if len(message) != 4 or len(fds) not in FDS_PER_REQUEST:
            for fd in fds:
                os.close(fd)
            continue
        (slot,) = struct.unpack("=I", message)
        isolation.unshare(isolation.CLONE_NEWPID)  # the next child is pid 1 of a new namespace
        try:
            pid = os.fork()
        except OSError:
            pid = -1  # the host sees the protocol socket close: the start failed
        if pid == 0:
            try:
                child(slot, fds, config, program, [control.fileno(), own_pid_ns])
            finally:
                os._exit(EXIT_SETUP_FAILED)  # a child never returns into the zygote's loop
        isolation.setns(own_pid_ns, isolation.CLONE_NEWPID)
        for fd in fds:
            os.close(fd)
        served += 1


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    program = isolation.compile_seccomp(config["seccomp"])
    warm_imports()
    gc.collect()
    gc.freeze()
    serve(control, config, program)


if __name__ == "__main__":
    main()
