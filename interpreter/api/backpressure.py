"""Request bodies that are streamed are read with backpressure.

Quart copies every body message into an unbounded buffer as fast as the client sends, so a
100 MB upload to a slower store would sit in memory. Here, once a body that the route *iterates*
holds BODY_BUFFER_BYTES, the connection stops taking messages from hypercorn until the route has
read them; hypercorn's own bounded queue then stops reading the socket, and TCP slows the client.
A body that is awaited whole (JSON, capped by BodyCap) is read as before.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import trio
from quart import Request
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest

BODY_BUFFER_BYTES = 1024 * 1024


class BoundedBody(TrioBody):
    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self.whole = False  # awaited as a whole: no bound (the route wants all of it anyway)
        self._room = trio.Event()

    async def __anext__(self) -> bytes:
        data = await super().__anext__()
        self._room.set()
        return data

    def __await__(self) -> Generator[Any, None, Any]:
        self.whole = True
        self._room.set()
        return super().__await__()

    async def wait_for_room(self) -> None:
        while not self.whole and not self._complete.is_set() and len(self._data) >= BODY_BUFFER_BYTES:
            self._room = trio.Event()
            await self._room.wait()


class BoundedRequest(TrioRequest):
    body_class = BoundedBody


class BoundedHTTPConnection(TrioASGIHTTPConnection):
    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: Any
    ) -> None:
        body = request.body
        while True:
            if isinstance(body, BoundedBody):
                await body.wait_for_room()
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()  # the client is gone: so is its request
