"""multipart/form-data read as a stream of parts, each part's data as a stream of chunks.

File parts go straight to the blob store, so an upload never sits in memory whole (the body
itself is read with backpressure, ``backpressure.py``). Text fields are small and capped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from interpreter.errors import UnsupportedMediaType, ValidationFailed

DECODER_BUFFER_BYTES = 4 * 1024 * 1024  # part headers and one body message; file data never accumulates
FIELD_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a text field
    content_type: str | None


def malformed(message: str) -> ValidationFailed:
    return ValidationFailed(details=[{"field": "body", "message": message, "code": "multipart_invalid"}])


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
        self._decoder = MultipartDecoder(boundary.encode(), DECODER_BUFFER_BYTES)
        self._in_data = False
        self._ended = False

    async def _event(self) -> object:
        try:
            while (event := self._decoder.next_event()) is NEED_DATA:
                if self._ended:
                    raise malformed("The multipart body ended before its last part")
                chunk = await anext(self._body, None)
                self._ended = chunk is None
                self._decoder.receive_data(chunk)
            return event
        except (ValueError, RequestEntityTooLarge):
            raise malformed("The multipart body is malformed") from None

    async def next_part(self) -> Part | None:
        """The next part, or None after the last one."""
        async for _ in self.data():  # skip what is left of the current part
            pass
        while True:
            event = await self._event()
            if isinstance(event, Epilogue):
                return None
            if isinstance(event, File | Field):
                self._in_data = True
                filename = event.filename if isinstance(event, File) else None
                return Part(event.name or "", filename, event.headers.get("content-type"))

    async def data(self) -> AsyncIterator[bytes]:
        """The current part's data as it arrives."""
        while self._in_data:
            event = await self._event()
            if isinstance(event, Data):
                self._in_data = event.more_data
                if event.data:
                    yield event.data

    async def text(self) -> str:
        """The current part as text (form fields), at most FIELD_MAX_BYTES."""
        collected = bytearray()
        async for chunk in self.data():
            collected += chunk
            if len(collected) > FIELD_MAX_BYTES:
                raise malformed(f"A form field is larger than {FIELD_MAX_BYTES} bytes")
        return collected.decode("utf-8", errors="replace")
