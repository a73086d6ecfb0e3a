"""The streaming multipart reader: parts in order whatever the chunking, clear errors for broken bodies."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from interpreter.api import multipart
from interpreter.api.multipart import MultipartReader
from interpreter.errors import RequestTimeout, UnsupportedMediaType, ValidationFailed

CONTENT_TYPE = "multipart/form-data; boundary=XyZ"
# Binary data with CR, LF, dashes and near-misses of the delimiter wherever a chunk may cut it.
DATA = bytes(range(256)) * 4 + b"\r\n--Xy\r\r\n-\r\n--XyW\n--XyZ\r" * 5 + b"\r"
BODY = (
    b'--XyZ\r\nContent-Disposition: form-data; name="entity_id"\r\n\r\nagent_1\r\n'
    b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a/b.bin"\r\nContent-Type: image/png\r\n\r\n'
    + DATA
    + b"\r\n--XyZ\r\n"
    b'Content-Disposition: form-data; name="file"; filename="empty.txt"\r\n\r\n\r\n--XyZ--\r\n'
)


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_all(reader: MultipartReader) -> list[tuple[str, str | None, str | None, bytes]]:
    parts = []
    while (part := await reader.next_part()) is not None:
        data = b"".join([chunk async for chunk in reader.data()])
        parts.append((part.name, part.filename, part.content_type, data))
    return parts


@pytest.mark.parametrize("size", [*range(1, 24), 64, 1000, len(BODY)])
async def test_parts_come_out_whole_whatever_the_chunking(size: int) -> None:
    parts = await read_all(MultipartReader(chunks_of(BODY, size), CONTENT_TYPE))
    assert parts == [
        ("entity_id", None, None, b"agent_1"),
        ("file", "a/b.bin", "image/png", DATA),
        ("file", "empty.txt", None, b""),
    ]


async def test_an_unread_part_is_skipped() -> None:
    reader = MultipartReader(chunks_of(BODY, 100), CONTENT_TYPE)
    names = []
    while (part := await reader.next_part()) is not None:
        names.append(part.filename)
    assert names == [None, "a/b.bin", "empty.txt"]


async def test_a_truncated_body_is_a_validation_error() -> None:
    reader = MultipartReader(chunks_of(BODY[:300], 50), CONTENT_TYPE)
    with pytest.raises(ValidationFailed):
        await read_all(reader)


async def test_a_body_that_stops_arriving_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multipart, "BODY_IDLE_S", 0.2)

    async def stalled() -> AsyncIterator[bytes]:
        yield BODY[:100]
        await trio.sleep_forever()
        yield b""

    with pytest.raises(RequestTimeout):
        await read_all(MultipartReader(stalled(), CONTENT_TYPE))


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", None])
async def test_what_is_not_multipart_is_refused_at_once(content_type: str | None) -> None:
    with pytest.raises((UnsupportedMediaType, ValidationFailed)):
        MultipartReader(chunks_of(b"", 1), content_type)


@pytest.mark.parametrize("size", [1, 13, 100, len(BODY)])
async def test_a_consumer_that_stops_mid_part_can_go_on_to_the_next(size: int) -> None:
    reader = MultipartReader(chunks_of(BODY, size), CONTENT_TYPE)
    filenames = []
    while (part := await reader.next_part()) is not None:
        filenames.append(part.filename)
        async with contextlib.aclosing(reader.data()) as data:
            async for _ in data:
                break  # what a blob store does with a file over its size limit
    assert filenames == [None, "a/b.bin", "empty.txt"]
