"""Which CONNECT targets the egress proxy accepts: a registry's name on port 443, never an address.

An entry is an exact host name (``pypi.org``) or a dot-suffix (``.pythonhosted.org``: any name below
it, not the name itself). Names are compared lowercased, without a trailing dot, and must be real DNS
names: an IP literal in any spelling (``127.1``, ``2130706433``, ``[::1]``, ``0x7f.1``) is refused
before the allowlist is even consulted, since a resolver would turn some of them into addresses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

ALLOWED_PORT = 443
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Refused(Exception):
    """The proxy says no: ``status`` is the HTTP status it answers, the message its reason (logged)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def normalise_host(name: str) -> str:
    """The canonical form of a host name, or Refused(403) for anything that is not a DNS name."""
    host = name.strip().lower().removesuffix(".")
    if host.startswith("[") or ":" in host:
        raise Refused(403, "IP literals are not allowed")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise Refused(403, "IP literals are not allowed")
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise Refused(400, "not a valid host name")
    if labels[-1].isdigit() or re.fullmatch(r"0x[0-9a-f]*", labels[-1]):
        # inet_aton's spellings (127.1, 2130706433, 0x7f.1): a resolver reads them as addresses.
        raise Refused(403, "IP literals are not allowed")
    return host


def parse_authority(authority: str) -> tuple[str, int]:
    """``host:port`` of a CONNECT request line, checked: a DNS name (not an address) and port 443."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or not host:
        if authority.startswith("[") or authority.count(":") > 1:
            raise Refused(403, "IP literals are not allowed")
        raise Refused(400, "CONNECT needs host:port")
    host = normalise_host(host)
    port = int(port_text)
    if port != ALLOWED_PORT:
        raise Refused(403, f"only port {ALLOWED_PORT} is allowed")
    return host, port


@dataclass(frozen=True)
class Allowlist:
    exact: frozenset[str]
    suffixes: tuple[str, ...]  # each with its leading dot

    @classmethod
    def of(cls, entries: list[str]) -> Allowlist:
        """From entries as operators write them (``pypi.org``, ``.example.com``); invalid ones raise ValueError."""
        exact, suffixes = set(), set()
        for entry in entries:
            text = entry.strip().lower()
            if not text:
                continue
            try:
                host = normalise_host(text.removeprefix("."))
            except Refused as refused:
                raise ValueError(f"{entry!r}: {refused.reason}") from None
            (suffixes.add("." + host) if text.startswith(".") else exact.add(host))
        return cls(frozenset(exact), tuple(sorted(suffixes)))

    def allows(self, host: str) -> bool:
        return host in self.exact or any(host.endswith(suffix) for suffix in self.suffixes)

    def entries(self) -> list[str]:
        return sorted(self.exact) + list(self.suffixes)
