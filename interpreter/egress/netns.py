"""A network namespace per sandbox, holding ``lo`` and the proxy's listening socket, and nothing else.

Why this path and not a veth pair or a bind-mounted Unix socket with a forwarder: a socket stays in
the namespace it was created in, so the host can make the namespace, create the proxy's listening
socket inside it and step back out, all in one worker thread (network namespaces are per thread).
The sandbox then joins that namespace (nsjail with ``--disable_clone_newnet``, started through
``nsenter``) and finds 127.0.0.1:SANDBOX_EGRESS_PORT answered by the proxy itself. There is no
route, no interface but ``lo``, no forwarder process the sandbox could kill or impersonate, no
firewall rule to get wrong, and the proxy knows which sandbox each connection comes from because
each sandbox has its own listener. The namespace belongs to the host's user namespace, so nothing
in the jail can reconfigure it. Zygote kernels make their namespace in the child and hand the
listener over instead (``sandboxes/kernel/zygote.py``): the zygote's children may not join a
namespace the host owns.
"""

from __future__ import annotations

import os
import socket

from sandboxes.kernel.isolation import CLONE_NEWNET, loopback_up, setns, unshare

BACKLOG = 64
NSENTER = "/usr/bin/nsenter"


def listen_in_new_namespace(port: int) -> tuple[int, socket.socket]:
    """(an fd of a new network namespace with ``lo`` up, a socket listening on 127.0.0.1:``port`` in it).

    Blocking: call it in a worker thread, which it leaves in the network namespace it found.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare(CLONE_NEWNET)
        try:
            namespace = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                loopback_up()
                listener = socket.create_server(("127.0.0.1", port), backlog=BACKLOG)
            except BaseException:
                os.close(namespace)
                raise
        finally:
            try:
                setns(own, CLONE_NEWNET)
            except OSError:  # a worker thread stuck in a sandbox's namespace would break later work: stop
                os.abort()
    finally:
        os.close(own)
    return namespace, listener
