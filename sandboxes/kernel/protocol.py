"""The kernel protocol's framing (DESIGN §6), shared by the kernel (in the jail) and the host.

Standard library only: this file is copied into the jail. A frame is

    u32 length of what follows | u8 kind | u32 length of the JSON header | JSON header | payload bytes

Output and state travel as raw payload bytes, never inside JSON. The host treats every frame as
hostile input (the user's code shares the kernel's process): sizes are capped and a malformed
frame ends the kernel.
"""

from __future__ import annotations

import json
import struct
from typing import Any

PREFIX = struct.Struct(">IBI")  # rest length, kind, header length

# host -> kernel
RUN = 1
STDIN = 2
STDIN_EOF = 3
INTERRUPT = 4
TOOL_RESULT = 5
CHECKPOINT = 6
RESTORE = 7
# kernel -> host
READY = 20
STARTED = 21
STDOUT = 22
STDERR = 23
TOOL_CALL = 24
RESULT = 25
STATE = 26

NAMES = {
    RUN: "run", STDIN: "stdin", STDIN_EOF: "stdin_eof", INTERRUPT: "interrupt", TOOL_RESULT: "tool_result",
    CHECKPOINT: "checkpoint", RESTORE: "restore", READY: "ready", STARTED: "started", STDOUT: "stdout",
    STDERR: "stderr", TOOL_CALL: "tool_call", RESULT: "result", STATE: "state",
}  # fmt: skip
HEADER_MAX = 1024 * 1024


class ProtocolError(Exception):
    """A frame that breaks the format or a limit."""


def encode(kind: int, header: dict[str, Any] | None = None, payload: bytes = b"") -> bytes:
    raw = json.dumps(header or {}, separators=(",", ":")).encode()
    return PREFIX.pack(1 + 4 + len(raw) + len(payload), kind, len(raw)) + raw + payload


def decode_prefix(prefix: bytes, max_frame: int) -> tuple[int, int, int]:
    """(bytes still to read, kind, header length), checked against the limits."""
    rest, kind, header_length = PREFIX.unpack(prefix)
    if kind not in NAMES:
        raise ProtocolError(f"unknown frame kind {kind}")
    if rest > max_frame or header_length > HEADER_MAX or header_length > rest - 5:
        raise ProtocolError("frame too large or inconsistent")
    return rest - 5, kind, header_length


def decode_body(body: bytes, header_length: int) -> tuple[dict[str, Any], bytes]:
    try:
        header = json.loads(body[:header_length])
    except ValueError:
        raise ProtocolError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not an object")
    return header, body[header_length:]
