"""multipart/form-data read as a stream of parts, each part's data as a stream of chunks.

File parts go straight to the blob store, so an upload never sits in memory whole (the body
itself is read with backpressure, ``backpressure.py``). Text fields are small and capped.

The parser is ours, not werkzeug's decoder: that one emits a wrong byte when a chunk of the body
ends inside a boundary's line break (an upload's content would change with TCP segmentation).
Here data is released only up to where a delimiter could begin, so chunking never matters.
Line breaks are CRLF, as RFC 7578 and every client we know send them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import trio
from werkzeug.datastructures import Headers
from werkzeug.http import parse_options_header

from interpreter.errors import RequestTimeout, UnsupportedMediaType, ValidationFailed

HEADERS_MAX_BYTES = 16 * 1024
FIELD_MAX_BYTES = 64 * 1024
EPILOGUE_MAX_BYTES = 64 * 1024
BODY_IDLE_S = 60  # a client that stops sending mid-body does not hold its upload open for ever
CRLF = b"\r\n"


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a text field
    content_type: str | None


def malformed(message: str) -> ValidationFailed:
    return ValidationFailed(details=[{"field": "body", "message": message, "code": "multipart_invalid"}])


def _headers(block: bytes) -> Headers:
    headers = Headers()
    for line in block.decode("utf-8", errors="replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise malformed("A part header is malformed")
        headers.add(name.strip(), value.strip())
    return headers


class MultipartReader:
    """Parts in order; the data of a part not read before asking for the next one is skipped."""

    def __init__(self, body: AsyncIterator[bytes], content_type: str | None) -> None:
        mimetype, options = parse_options_header(content_type or "")
        if mimetype != "multipart/form-data":
            raise UnsupportedMediaType(f"Unsupported content type: {mimetype[:60] or 'none'}; send multipart/form-data")
        boundary = options.get("boundary", "")
        if not boundary or len(boundary) > 200:
            raise malformed("The multipart boundary is missing or invalid")
        self._body = body
        self._delimiter = b"\r\n--" + boundary.encode()
        self._buffer = bytearray(CRLF)  # so that the first boundary looks like every other one
        self._in_data = False
        self._started = False
        self._done = False

    async def _next_chunk(self) -> bytes | None:
        with trio.move_on_after(BODY_IDLE_S) as idle:
            chunk = await anext(self._body, None)
        if idle.cancelled_caught:
            raise RequestTimeout(f"No part of the request body arrived for {BODY_IDLE_S} s")
        return chunk

    async def _fill(self) -> None:
        """Append the next chunk of the body to the buffer."""
        chunk = await self._next_chunk()
        if chunk is None:
            raise malformed("The multipart body ended before its last part")
        self._buffer += chunk

    async def _after_delimiter(self) -> bool:
        """Consume what follows a delimiter: True when a part's headers follow, False at the end."""
        while len(self._buffer) < 2:
            await self._fill()
        if self._buffer.startswith(b"--"):
            self._done = True
            received = len(self._buffer)  # the epilogue is read (so the client can finish) and ignored
            while received <= EPILOGUE_MAX_BYTES and (chunk := await self._next_chunk()) is not None:
                received += len(chunk)
            self._buffer.clear()
            return False
        while (end := self._buffer.find(CRLF)) < 0:  # transport padding (spaces) may precede the CRLF
            if len(self._buffer) > 256:
                raise malformed("A boundary line is malformed")
            await self._fill()
        if self._buffer[:end].strip(b" \t"):
            raise malformed("A boundary line is malformed")
        del self._buffer[: end + 2]
        return True

    async def next_part(self) -> Part | None:
        """The next part, or None after the last one."""
        async for _ in self.data():  # skip what is left of the current part
            pass
        if self._done:
            return None
        if not self._started:
            self._started = True
            while (start := self._buffer.find(self._delimiter)) < 0:  # a preamble is ignored
                del self._buffer[: max(0, len(self._buffer) - len(self._delimiter))]
                await self._fill()
            del self._buffer[: start + len(self._delimiter)]
            if not await self._after_delimiter():
                return None
        while (end := self._buffer.find(CRLF + CRLF)) < 0:
            if len(self._buffer) > HEADERS_MAX_BYTES:
                raise malformed("A part's headers are too large")
            await self._fill()
        headers = _headers(bytes(self._buffer[:end]))
        del self._buffer[: end + 4]
        disposition, options = parse_options_header(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in options:
            raise malformed("A part has no form-data Content-Disposition with a name")
        self._in_data = True
        return Part(options["name"], options.get("filename"), headers.get("content-type"))

    async def data(self) -> AsyncGenerator[bytes, None]:
        """The current part's data as it arrives."""
        keep = len(self._delimiter) - 1  # the longest tail that could be the start of a delimiter
        while self._in_data:
            found = self._buffer.find(self._delimiter)
            if found >= 0:
                chunk = bytes(self._buffer[:found])
                del self._buffer[: found + len(self._delimiter)]
                self._in_data = False
                # Before the last yield: a consumer that stops at it (a file over the size limit) must
                # not leave the reader between a part's data and the next part's headers.
                await self._after_delimiter()
                if chunk:
                    yield chunk
                return
            if len(self._buffer) > keep:
                chunk = bytes(self._buffer[: len(self._buffer) - keep])
                del self._buffer[: len(self._buffer) - keep]
                yield chunk
            await self._fill()

    async def text(self) -> str:
        """The current part as text (form fields), at most FIELD_MAX_BYTES."""
        collected = bytearray()
        async for chunk in self.data():
            collected += chunk
            if len(collected) > FIELD_MAX_BYTES:
                raise malformed(f"A form field is larger than {FIELD_MAX_BYTES} bytes")
        return collected.decode("utf-8", errors="replace")
