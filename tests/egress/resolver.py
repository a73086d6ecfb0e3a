"""The test suite's resolver for the egress proxy: no query ever leaves the machine.

``exempt`` names connect to a loopback address as given: the one exception to the proxy's rule against
inward addresses, which only this class (only importable from the test suite) makes. ``answers`` are
judged like real DNS answers (an inward one is refused). Every other name does not resolve.
"""

from __future__ import annotations

import ipaddress
import socket

from interpreter.egress.allowlist import Refused
from interpreter.egress.proxy import Address, require_public


class MappedResolver:
    def __init__(self, exempt: dict[str, tuple[str, int]], answers: dict[str, list[str]] | None = None) -> None:
        self.exempt, self.answers = exempt, answers or {}

    async def __call__(self, host: str, port: int) -> list[Address]:
        if host in self.exempt:
            address, mapped_port = self.exempt[host]
            return [(_family(address), (address, mapped_port))]
        if host not in self.answers:
            raise Refused(502, f"{host} does not resolve")
        return require_public(host, [(_family(a), (a, port)) for a in self.answers[host]])


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
