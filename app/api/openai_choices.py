"""The n choices of one /v1 request: n asks run together, answered whole or watched as one
stream.

Choices share nothing but the request: each is its own ask (its own row in the step batch, its
own random stream, seed + i), so a choice decodes exactly as the same ask would alone. Their
retrievals coalesce into one encoder call anyway (app/service.py).

Streamed, a choice's text is what its answer so far adds to what was sent, as on POST /ask.
Answers are stripped (RagService.ask strips them), so the stream holds back leading and
trailing whitespace until text follows it: the deltas then join into the plain answer exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from app.api.errors import openai_body, openai_error
from app.contracts import Hit
from app.errors import LoragError
from app.service import AskParams, AskResult, RagService

log = logging.getLogger(__name__)
Chunk = dict[str, Any]


def choices(base: AskParams, n: int) -> list[AskParams]:
    """n asks for one request: the same, but choice i samples with seed + i."""
    seed = base.sampling.seed
    if seed is None:
        return [base] * n
    return [replace(base, sampling=replace(base.sampling, seed=seed + i)) for i in range(n)]


async def ask_all(service: RagService, params: Sequence[AskParams]) -> list[AskResult]:
    """Every choice's answer; the first failure cancels the others and is raised."""
    works = [asyncio.ensure_future(service.ask(p)) for p in params]
    try:
        return list(await asyncio.gather(*works))
    finally:
        await _cancel(works)


async def _cancel(works: Sequence[asyncio.Future[AskResult]]) -> None:
    for work in works:
        if not work.done():
            work.cancel()
    for work in works:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work


def _shown(text: str) -> str:
    """What of an answer so far may be sent: not a trailing replacement character (a character
    whose bytes are still arriving), nor whitespace at either end (the answer is stripped)."""
    return text.rstrip("\ufffd").strip()


def _adds(sent: str, text: str) -> str:
    return text[len(sent) :] if text.startswith(sent) else ""


class Streams:
    """n asks started together, watched as one stream of (choice, text it adds) and
    (choice, its result)."""

    def __init__(self, service: RagService, params: Sequence[AskParams]) -> None:
        self._wake = asyncio.Event()  # set by every callback: something changed
        self._hits: list[list[Hit] | None] = [None] * len(params)
        self._texts = [""] * len(params)  # each choice's answer so far (its on_text)
        self._works = [
            asyncio.ensure_future(
                service.ask(
                    replace(p, on_hits=partial(self._on_hits, i), on_text=partial(self._on_text, i))
                )
            )
            for i, p in enumerate(params)
        ]

    def _on_hits(self, i: int, hits: list[Hit]) -> None:
        self._hits[i] = hits
        self._wake.set()

    def _on_text(self, i: int, text: str) -> None:
        self._texts[i] = text
        self._wake.set()

    async def _wait(self) -> None:
        """Until a callback fires or a choice ends (callbacks run on this loop: no race with
        the clear before each check)."""
        woken = asyncio.ensure_future(self._wake.wait())
        pending = {w for w in self._works if not w.done()}
        try:
            await asyncio.wait({woken, *pending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()

    async def passages(self) -> list[Hit]:
        """The first choice's passages, once every choice has its own. An error before that (an
        unknown model or index, an empty question) is raised: the stream has not begun."""
        while True:
            self._wake.clear()
            for work in self._works:
                if work.done() and (work.cancelled() or work.exception() is not None):
                    work.result()  # raises
            hits = self._hits[0]
            if hits is not None and all(h is not None for h in self._hits):
                return hits
            await self._wait()

    async def events(self) -> AsyncIterator[tuple[int, str | AskResult]]:
        """(i, text) as choice i's answer grows, then (i, result) when it ends; the first
        failure is raised."""
        sent = [""] * len(self._works)
        ended = [False] * len(self._works)
        while not all(ended):
            self._wake.clear()
            for i, work in enumerate(self._works):
                if ended[i]:
                    continue
                done = work.done()  # then its answer is final: all of it is sent
                text = work.result().answer if done else _shown(self._texts[i])
                piece = _adds(sent[i], text)
                if piece:
                    sent[i] += piece
                    yield i, piece
                if done:
                    ended[i] = True
                    yield i, work.result()
            if not all(ended):
                await self._wait()

    async def close(self) -> None:
        """Cancel what still runs (the client left: its rows leave the engine)."""
        await _cancel(self._works)


class Chunks(Protocol):
    """How one API writes its stream's chunks (chat.completion.chunk, text_completion)."""

    def opening(self, hits: list[Hit]) -> list[Chunk]: ...

    def piece(self, i: int, text: str) -> Chunk: ...

    def finish(self, i: int, result: AskResult) -> Chunk: ...

    def usage(self, results: list[AskResult]) -> Chunk | None: ...


def _sse(data: Chunk | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


async def sse_response(
    streams: Streams, chunks: Chunks, on_result: Callable[[AskResult], None]
) -> StreamingResponse:
    """The choices as server-sent events: the opening chunks once every choice has its
    passages, text chunks as answers grow, a finishing chunk per choice, the usage, then
    `data: [DONE]`. A failure before the passages is a plain error response (raised here); one
    after them is an `{"error": ...}` event, which the official SDK raises as an APIError."""
    try:
        hits = await streams.passages()
    except BaseException:
        await streams.close()
        raise

    async def events() -> AsyncIterator[str]:
        results: dict[int, AskResult] = {}
        try:
            for chunk in chunks.opening(hits):
                yield _sse(chunk)
            async for i, event in streams.events():
                if isinstance(event, str):
                    yield _sse(chunks.piece(i, event))
                    continue
                results[i] = event
                on_result(event)
                yield _sse(chunks.finish(i, event))
            usage = chunks.usage([results[i] for i in sorted(results)])
            if usage is not None:
                yield _sse(usage)
        except LoragError as exc:
            error = openai_error(exc)
            yield _sse(openai_body(error.status, str(error), param=error.param, code=error.code))
        except Exception:
            log.exception("a streamed /v1 answer failed")
            yield _sse(openai_body(500, "internal server error"))
        finally:
            await streams.close()  # the client left: its rows leave the engine
        yield _sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
