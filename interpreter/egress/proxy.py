"""The egress proxy: HTTP CONNECT to allowlisted registries on port 443, from sandboxes only.

It listens nowhere on the host. Each sandbox that may use the network has a network namespace of its
own holding nothing but ``lo`` and one listening socket on 127.0.0.1:SANDBOX_EGRESS_PORT that this
process made there (``netns.py``); ``attach`` serves that socket, so every connection arrives already
labelled with its sandbox, and the sandbox can reach nothing else at all: not this server, not Redis,
not any other loopback service, not the local network.

Per tunnel: the request head (at most 8 KiB, within 10 s) must be ``CONNECT host:443``; the host must
be a DNS name on the allowlist; the proxy resolves it itself and refuses when any answer is not a
public address (so a DNS answer cannot point it inward), then connects to exactly the addresses it
checked and splices bytes both ways until either side closes or both stay idle. It never sees TLS
plaintext. Every refusal is a security log event.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import trio

from interpreter.egress.allowlist import Allowlist, Refused, parse_authority
from interpreter.errors import ServiceUnavailable
from interpreter.metrics import Counter

log = logging.getLogger("interpreter.egress")
security_log = logging.getLogger("interpreter.security")

HEAD_MAX = 8192
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0
TUNNELS_PER_SANDBOX = 16  # npm opens up to 15 sockets at once; more wait in the backlog
CHUNK = 65536
LOGGED_REFUSALS = 20  # per sandbox; more are counted, not logged (a connect loop must not flood the log)
ACCEPT_RETRY_S = 0.1
# Lookups block a thread each: their own few, so slow or endless DNS never takes the threads runs need.
RESOLVER_THREADS = trio.CapacityLimiter(8)
REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
           431: "Request Header Fields Too Large", 502: "Bad Gateway", 504: "Gateway Timeout"}  # fmt: skip

Address = tuple[int, tuple[Any, ...]]  # (address family, sockaddr)
Resolver = Callable[[str, int], Awaitable[list[Address]]]


def is_public(address: str) -> bool:
    """True for an address on the public internet: not loopback, private, link-local, multicast, reserved,
    unspecified or otherwise special (an IPv4 address inside IPv6 is judged as the IPv4 address)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and (mapped := ip.ipv4_mapped or ip.sixtofour) is not None:
        ip = mapped
    bad = ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
    if isinstance(ip, ipaddress.IPv6Address):
        bad = bad or ip.is_site_local  # fec0::/10, deprecated but routed inward where still in use
    return ip.is_global and not bad and not ip.is_unspecified


def require_public(host: str, addresses: list[Address]) -> list[Address]:
    if not addresses:
        raise Refused(502, f"{host} does not resolve")
    if not all(is_public(sockaddr[0]) for _, sockaddr in addresses):
        raise Refused(403, f"{host} resolves to a non-public address")
    return addresses


async def system_resolver(host: str, port: int) -> list[Address]:
    """The machine's resolver; every answer must be a public address. The name is looked up as given
    (absolute: no search domain is ever appended)."""
    try:
        infos = await trio.to_thread.run_sync(partial(socket.getaddrinfo, host + ".", port, type=socket.SOCK_STREAM),
                                              limiter=RESOLVER_THREADS, abandon_on_cancel=True)  # fmt: skip
    except OSError:
        raise Refused(502, f"{host} does not resolve") from None
    return require_public(host, [(family, sockaddr) for family, _, _, _, sockaddr in infos])


@dataclass
class Tap:
    """One sandbox's use of the proxy: its label for the logs, and what it did."""

    run_id: str
    owner: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    sent: int = 0  # bytes from the sandbox to registries
    received: int = 0
    tunnels: int = 0
    refused: int = 0

    def close(self) -> None:
        """The sandbox is gone: its listener and tunnels close."""
        self.scope.cancel()

    def figures(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received, "tunnels": self.tunnels, "refused": self.refused}


class EgressProxy:
    def __init__(self, allowlist: Allowlist, resolver: Resolver = system_resolver) -> None:
        self.allowlist, self.resolver = allowlist, resolver
        self._nursery: trio.Nursery | None = None
        self.attached = 0  # sandboxes served now
        self.tunnels = Counter("interpreter_egress_tunnels_total", "Egress tunnels opened by sandboxes")
        self.refusals = Counter("interpreter_egress_refusals_total", "Egress requests refused, by status")
        self.bytes = Counter("interpreter_egress_bytes_total", "Bytes through egress tunnels, by direction")

    def statistics(self) -> dict[str, object]:
        return {"attached": self.attached, "tunnels": sum(self.tunnels.values.values()),
                "refused": sum(self.refusals.values.values())}  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Serves attached sandboxes; cancelling it closes every listener and tunnel."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def attach(self, listener: socket.socket, run_id: str, owner: str) -> Tap:
        """Serve ``listener`` (a listening socket in one sandbox's namespace; the proxy owns it from here)
        until ``Tap.close``."""
        if self._nursery is None:
            listener.close()
            raise ServiceUnavailable("The egress proxy is not running", retry_after_s=2)
        tap = Tap(run_id, owner)
        self._nursery.start_soon(self._serve_sandbox, trio.socket.from_stdlib_socket(listener), tap)
        return tap

    async def _serve_sandbox(self, listener: trio.socket.SocketType, tap: Tap) -> None:
        """One sandbox's listener until its tap closes; nothing that happens here reaches other sandboxes."""
        self.attached += 1
        slots = trio.Semaphore(TUNNELS_PER_SANDBOX)
        try:
            with tap.scope, listener:
                async with trio.open_nursery() as tunnels:
                    while True:
                        await slots.acquire()
                        try:
                            sock, _ = await listener.accept()
                        except OSError as exc:  # out of fds, a connection reset before accept, ...
                            slots.release()
                            log.warning("egress accept failed", extra={"fields": {"error": exc.strerror}})
                            await trio.sleep(ACCEPT_RETRY_S)
                            continue
                        except BaseException:
                            slots.release()
                            raise
                        tunnels.start_soon(self._tunnel, trio.SocketStream(sock), tap, slots)
        except Exception:  # a bug must end this sandbox's network only, never the proxy
            log.exception("an egress listener failed")
        finally:
            self.attached -= 1

    async def _tunnel(self, client: trio.SocketStream, tap: Tap, slots: trio.Semaphore) -> None:
        target = ""
        try:
            async with client:
                try:
                    with trio.fail_after(HEAD_TIMEOUT_S):
                        head, rest = await _read_head(client)
                    target = _connect_target(head)
                    host, port = parse_authority(target)
                    if not self.allowlist.allows(host):
                        raise Refused(403, f"{host} is not on the egress allowlist")
                    upstream = await self._connect(host, port)
                except trio.TooSlowError:
                    await self._refuse(client, tap, target, Refused(408, "no complete request in time"))
                    return
                except Refused as refused:
                    await self._refuse(client, tap, target, refused)
                    return
                async with upstream:
                    tap.tunnels += 1
                    self.tunnels.inc()
                    log.debug("egress tunnel", extra={"fields": {"run_id": tap.run_id, "host": host}})
                    await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    if rest:  # sent right behind the head, before the 200
                        tap.sent += len(rest)
                        self.bytes.inc(len(rest), direction="out")
                        await upstream.send_all(rest)
                    await _splice(client, upstream, tap, self.bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side went away
        except Exception:  # a bug must end this tunnel only, never the sandbox's listener or the proxy
            log.exception("an egress tunnel failed")
        finally:
            slots.release()

    async def _connect(self, host: str, port: int) -> trio.SocketStream:
        with trio.move_on_after(CONNECT_TIMEOUT_S):
            addresses = await self.resolver(host, port)
            error: OSError | None = None
            for family, sockaddr in addresses:
                sock = trio.socket.socket(family, socket.SOCK_STREAM)
                try:
                    await sock.connect(sockaddr)
                except OSError as exc:
                    sock.close()
                    error = exc
                    continue
                except BaseException:  # cancelled (the timeout): no half-open socket left behind
                    sock.close()
                    raise
                return trio.SocketStream(sock)
            raise Refused(502, f"{host} refused the connection ({error.strerror if error else 'no address'})")
        raise Refused(504, f"{host} did not answer in {CONNECT_TIMEOUT_S:g} s")

    async def _refuse(self, client: trio.SocketStream, tap: Tap, target: str, refused: Refused) -> None:
        tap.refused += 1
        self.refusals.inc(status=str(refused.status))
        if tap.refused <= LOGGED_REFUSALS:
            last = " (more from this run are counted, not logged)" if tap.refused == LOGGED_REFUSALS else ""
            security_log.warning("egress refused" + last, extra={"fields": {
                "run_id": tap.run_id, "principal": tap.owner, "target": target[:300], "status": refused.status,
                "reason": refused.reason[:300]}})  # fmt: skip
        reply = (f"HTTP/1.1 {refused.status} {REASONS.get(refused.status, 'Refused')}\r\n"
                 "Content-Length: 0\r\nConnection: close\r\n\r\n")  # fmt: skip
        with trio.move_on_after(1):
            await client.send_all(reply.encode())


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """The request head (up to and without its blank line) and any bytes already read after it."""
    data = bytearray()
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > HEAD_MAX:
            raise Refused(431, f"request head over {HEAD_MAX} bytes")
        chunk = await stream.receive_some(HEAD_MAX)
        if not chunk:
            raise Refused(400, "the connection closed before the request was complete")
        data += chunk
    if end > HEAD_MAX:
        raise Refused(431, f"request head over {HEAD_MAX} bytes")
    return bytes(data[:end]), bytes(data[end + 4 :])


def _connect_target(head: bytes) -> str:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Refused(400, "not an HTTP/1 request")
    method, target, _ = parts
    if method != "CONNECT":
        raise Refused(405, f"{method[:20]} is not allowed: only CONNECT tunnels (HTTPS) are")
    return target


async def _splice(client: trio.SocketStream, upstream: trio.SocketStream, tap: Tap, counter: Counter) -> None:
    """Both directions, each passing on its end (half-close), until both have ended, either side breaks,
    or nothing moves either way for IDLE_TIMEOUT_S."""
    with trio.CancelScope() as idle:

        async def pump(source: trio.SocketStream, sink: trio.SocketStream, outbound: bool) -> None:
            try:
                while chunk := await source.receive_some(CHUNK):
                    if outbound:
                        tap.sent += len(chunk)
                    else:
                        tap.received += len(chunk)
                    counter.inc(len(chunk), direction="out" if outbound else "in")
                    await sink.send_all(chunk)
                    idle.deadline = trio.current_time() + IDLE_TIMEOUT_S
                await sink.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                idle.cancel()  # one side broke: the tunnel is over

        idle.deadline = trio.current_time() + IDLE_TIMEOUT_S
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, True)
            nursery.start_soon(pump, upstream, client, False)
