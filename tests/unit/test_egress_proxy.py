"""The egress proxy's allow/deny table, over real loopback sockets: a client plays the sandbox, a TCP
echo server plays the registry (reached only through the test resolver's one exempt name)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from interpreter.egress.allowlist import Allowlist
from interpreter.egress.proxy import LOGGED_REFUSALS, TUNNELS_PER_SANDBOX, EgressProxy, Tap
from tests.egress.resolver import MappedResolver


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


@asynccontextmanager
async def proxy_and_registry() -> AsyncIterator[tuple[int, EgressProxy, Tap]]:
    """(the sandbox-side port, the proxy, the sandbox's tap)."""
    async with trio.open_nursery() as nursery:
        registry = (await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1")))[0]
        registry_port = registry.socket.getsockname()[1]
        answers = {"rebind.example": ["127.0.0.1"], "private.example": ["10.1.2.3"],
                   "mixed.example": ["8.8.8.8", "192.168.1.1"], "mapped.example": ["::ffff:127.0.0.1"],
                   "linklocal.example": ["169.254.169.254"]}  # fmt: skip
        with socket.socket() as closed:  # a port nothing listens on
            closed.bind(("127.0.0.1", 0))
            closed_port = closed.getsockname()[1]
        resolver = MappedResolver({"pypi.org": ("127.0.0.1", registry_port),
                                   "closed.example": ("127.0.0.1", closed_port)}, answers)  # fmt: skip
        allowlist = Allowlist.of(["pypi.org", ".pythonhosted.org", "nowhere.example", "closed.example", *answers])
        proxy = EgressProxy(allowlist, resolver)
        await nursery.start(proxy.run)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        tap = proxy.attach(listener, "run-1", "tenant-a")
        yield port, proxy, tap
        nursery.cancel_scope.cancel()


async def ask(port: int, request: bytes) -> bytes:
    """Send ``request``; the proxy's whole answer (it closes after a refusal)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
                if b"\r\n\r\n" in data and not data.startswith(b"HTTP/1.1 200"):
                    break
        return data


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("request_line", "expected"),
    [
        ("CONNECT example.com:443", 403),  # not on the allowlist
        ("CONNECT pypi.org.evil.com:443", 403),  # an allowed name as a prefix is not the name
        ("CONNECT evilpypi.org:443", 403),  # nor as a bare suffix
        ("CONNECT pythonhosted.org:443", 403),  # a dot-suffix entry covers names below it only
        ("CONNECT pypi.org:80", 403),  # port 443 only
        ("CONNECT pypi.org:22", 403),
        ("CONNECT 127.0.0.1:443", 403),  # IP literals, in every spelling a resolver would accept
        ("CONNECT 2130706433:443", 403),
        ("CONNECT 127.1:443", 403),
        ("CONNECT 0x7f.0.0.1:443", 403),
        ("CONNECT [::1]:443", 403),
        ("CONNECT [::ffff:127.0.0.1]:443", 403),
        ("CONNECT 8.8.8.8:443", 403),  # public literals too: names only
        ("CONNECT rebind.example:443", 403),  # allowlisted, but DNS points it at loopback
        ("CONNECT private.example:443", 403),  # ... at the local network
        ("CONNECT mixed.example:443", 403),  # one inward answer among public ones is enough
        ("CONNECT mapped.example:443", 403),  # loopback dressed as IPv6
        ("CONNECT linklocal.example:443", 403),  # the cloud metadata address
        ("CONNECT nowhere.example:443", 502),  # allowlisted, does not resolve
        ("CONNECT closed.example:443", 502),  # allowlisted, resolves, refuses the connection
        ("CONNECT pypi.org", 400),  # no port
        ("CONNECT pypi.org:\u00b2", 400),  # a digit to isdigit(), not to int()
        ("CONNECT bad_name!.org:443", 400),
        ("GET http://pypi.org/simple/ HTTP/1.1", 405),  # plain HTTP is not proxied
        ("POST http://pypi.org/ HTTP/1.1", 405),
        ("GET / HTTP/1.1", 405),
    ],
)
async def test_refusals(request_line: str, expected: int) -> None:
    line = request_line if request_line.endswith("HTTP/1.1") else f"{request_line} HTTP/1.1"
    async with proxy_and_registry() as (port, proxy, tap):
        reply = await ask(port, f"{line}\r\nHost: x\r\n\r\n".encode())
        assert status(reply) == expected, reply
        assert tap.refused == 1
        assert tap.tunnels == 0
        assert sum(proxy.refusals.values.values()) == 1


async def test_a_connect_loop_is_counted_but_logged_only_so_often(caplog: pytest.LogCaptureFixture) -> None:
    async with proxy_and_registry() as (port, _, tap):
        for _ in range(LOGGED_REFUSALS + 5):
            assert status(await ask(port, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")) == 403
    assert tap.refused == LOGGED_REFUSALS + 5
    logged = [r.getMessage() for r in caplog.records if r.name == "interpreter.security"]
    assert len(logged) == LOGGED_REFUSALS
    assert logged[-1] == "egress refused (more from this run are counted, not logged)"


async def test_an_oversized_head_is_refused() -> None:
    async with proxy_and_registry() as (port, _, tap):
        reply = await ask(port, b"CONNECT pypi.org:443 HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n")
        assert status(reply) == 431
        assert tap.refused == 1


async def test_not_http_at_all_is_refused() -> None:
    async with proxy_and_registry() as (port, _, _tap):
        assert status(await ask(port, b"\x16\x03\x01\x02\x00 hello\r\n\r\n")) == 400


async def test_an_allowed_name_is_tunnelled_and_counted() -> None:
    async with proxy_and_registry() as (port, proxy, tap):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            # Bytes sent right behind the head (a client that does not wait for the 200) go through too.
            await stream.send_all(b"CONNECT PyPI.org.:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\nearly ")
            data = b""
            with trio.fail_after(5):
                while b"early " not in data:
                    data += await stream.receive_some(4096)
                assert data.startswith(b"HTTP/1.1 200")
                await stream.send_all(b"x" * 100_000)
                echoed = data.split(b"\r\n\r\n", 1)[1]
                while len(echoed) < 100_006:
                    echoed += await stream.receive_some(65536)
        assert echoed == b"early " + b"x" * 100_000
        assert tap.sent == tap.received == 100_006  # counted before each chunk was passed on
        assert tap.tunnels == 1
        assert tap.refused == 0
        assert proxy.bytes.values[(("direction", "out"),)] == 100_006


async def test_closing_the_tap_ends_its_tunnels_and_listener() -> None:
    async with proxy_and_registry() as (port, _, tap):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        tap.close()
        with trio.fail_after(5):
            assert await stream.receive_some(4096) == b""  # the tunnel is closed under the client
        await stream.aclose()
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("127.0.0.1", port)  # and nothing listens any more


async def test_a_sandbox_has_a_bounded_number_of_tunnels() -> None:
    async with proxy_and_registry() as (port, _, tap):
        streams = []
        for _ in range(TUNNELS_PER_SANDBOX):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
            with trio.fail_after(5):
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
            streams.append(stream)
        extra = await trio.open_tcp_stream("127.0.0.1", port)  # queued in the backlog, not served
        await extra.send_all(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        with trio.move_on_after(0.5) as waited:
            await extra.receive_some(4096)
        assert waited.cancelled_caught
        assert tap.tunnels == TUNNELS_PER_SANDBOX  # the extra one is not accepted while the others last
        await streams.pop().aclose()  # one ends: the waiting one is served
        with trio.fail_after(5):
            assert (await extra.receive_some(4096)).startswith(b"HTTP/1.1 200")
        assert tap.tunnels == TUNNELS_PER_SANDBOX + 1
        for stream in (*streams, extra):
            await stream.aclose()
