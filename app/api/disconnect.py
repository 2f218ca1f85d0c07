"""Cancel a handler's work when its client goes away.

Starlette does not cancel a plain (non-streaming) endpoint when the client disconnects: the
work would run to the end for nobody. Once the request body has been read, the next ASGI
message the server delivers is `http.disconnect`, sent when the connection drops (or after the
response is complete), so waiting for it beside the work tells us the client left. The work is
then cancelled: an /ask still queued in the engine leaves the queue without running (a batch
already running finishes its rows, unobserved), and the response is 499, nginx's "client
closed request", which nobody reads but the logs and metrics count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

log = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("client disconnected; its request was cancelled")
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():  # this handler itself was cancelled
            task.cancel()
