"""POST /ask: retrieve, generate, cite; answered whole, or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import ApiDep, ServiceDep, StateDep
from app.api.disconnect import unless_disconnected
from app.api.errors import status_for
from app.api.schemas import AskRequest, AskResponse, PassageOut, Timings
from app.contracts import BASE_ADAPTER, Hit, Sampling
from app.errors import InvalidInputError, LoragError
from app.retrieval import filters
from app.service import AskParams, AskResult

router = APIRouter(tags=["ask"])
log = logging.getLogger(__name__)

STREAM_DOC = """With `"stream": true` the answer comes as server-sent events (text/event-stream):
`passages` once retrieval is done (each passage with its retrieval score), then `token` events
({"text": ...}, pieces that join into the answer) as the answer is decoded, and last `done`, the
whole response as without streaming (answer, passage weights, adapter version, timings). An
error after the stream began comes as an `error` event ({"status": ..., "detail": ...});
errors found before it (an unknown adapter, a bad index) are plain 4xx responses. RAG-Sequence
answers, and answers decoded in whole batches, arrive in one `token` event at the end."""


@router.post(
    "/ask",
    response_model=AskResponse,
    dependencies=[ApiDep],
    description=STREAM_DOC,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def ask(
    body: AskRequest, request: Request, service: ServiceDep, state: StateDep
) -> AskResponse | StreamingResponse:
    settings = state.settings
    params = AskParams(
        question=body.question,
        adapter=body.adapter,
        top_k=body.top_k,  # None: the adapter's task default, else settings.top_k
        max_new_tokens=body.max_new_tokens or settings.max_new_tokens,
        mode=body.mode,  # None: the adapter's task default, else settings.mode
        decoding=body.decoding,
        index=body.index,
        where=filters.parse(body.filter),
        search=body.retrieval,  # None: settings.retrieval
        sampling=sampling_of(body),
    )
    if body.stream:
        return await _stream(body, request, service, state, params)
    # a client that leaves takes its row out of the engine's queue (app/api/disconnect.py)
    result = await unless_disconnected(request, service.ask(params))
    return _respond(body, request, state, result)


def observe(state: Any, result: AskResult) -> None:
    """An answer's latency and tokens in the metrics (by adapter and mode); /v1 counts too."""
    labels = (result.adapter or BASE_ADAPTER, result.mode)
    state.metrics.ask_latency.labels(*labels).observe(result.timings_ms["total"] / 1000)
    state.metrics.generated_tokens.labels(*labels).inc(result.generated_tokens)
    state.metrics.citations_moved.labels(*labels).inc(result.citations_moved)


def passages_out(hits: list[Hit], weights: list[float]) -> list[PassageOut]:
    return [
        PassageOut(
            id=h.passage.id,
            doc_id=h.passage.doc_id,
            title=h.passage.title,
            text=h.passage.text,
            score=h.score,
            metadata=dict(h.metadata),
            weight=w,
        )
        for h, w in zip(hits, weights, strict=True)
    ]


def _respond(body: AskRequest, request: Request, state: Any, result: AskResult) -> AskResponse:
    observe(state, result)
    return AskResponse(
        answer=result.answer,
        adapter=result.adapter,
        adapter_version=result.adapter_version,
        mode=result.mode,
        passages=passages_out(result.hits, result.weights),
        timings_ms=Timings(**result.timings_ms),
        generated_tokens=result.generated_tokens,
        finish_reason=result.finish_reason,
        abstained=result.abstained,
        citations_moved=result.citations_moved,
        request_id=request.state.request_id,
    )


def sampling_of(body: AskRequest) -> Sampling:
    """The request's sampling; the schema has checked each field's range."""
    if any(not s for s in body.stop):
        raise InvalidInputError("stop strings must not be empty")
    return Sampling(body.temperature, body.top_p, body.seed, tuple(body.stop))


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _delta(sent: str, text: str) -> str:
    """What text adds to the part of the answer already sent: nothing unless text extends it;
    a trailing replacement character (a character whose bytes are still arriving) waits."""
    text = text.rstrip("\ufffd")
    return text[len(sent) :] if text.startswith(sent) else ""


async def _stream(
    body: AskRequest, request: Request, service: Any, state: Any, params: AskParams
) -> StreamingResponse:
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_hits(hits: list[Hit]) -> None:
        events.put_nowait(("hits", hits))

    def on_text(text: str) -> None:
        events.put_nowait(("text", text))

    work = asyncio.ensure_future(service.ask(replace(params, on_hits=on_hits, on_text=on_text)))
    # errors found before retrieval ends (unknown adapter or index, empty question) are plain
    # 4xx responses, raised here; after that, the stream has begun
    first = asyncio.ensure_future(events.get())
    await asyncio.wait({work, first}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        work.result()  # raises the error (the service always reports its passages first)
        raise RuntimeError("the answer came without its passages")
    _, hits = first.result()

    async def stream() -> AsyncIterator[str]:
        sent = ""
        try:
            yield _event(
                "passages",
                [
                    {
                        "id": h.passage.id,
                        "doc_id": h.passage.doc_id,
                        "title": h.passage.title,
                        "text": h.passage.text,
                        "score": h.score,
                    }
                    for h in hits
                ],
            )
            while True:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({work, get}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                piece = _delta(sent, get.result()[1])
                if piece:
                    sent += piece
                    yield _event("token", {"text": piece})
            try:
                result = work.result()
            except LoragError as exc:
                yield _event("error", {"status": status_for(exc), "detail": str(exc)})
                return
            except Exception:
                log.exception("a streamed answer failed")
                yield _event("error", {"status": 500, "detail": "Internal Server Error"})
                return
            rest = _delta(sent, result.answer)
            if rest:
                yield _event("token", {"text": rest})
            response = _respond(body, request, state, result)
            yield _event("done", response.model_dump(mode="json"))
        finally:
            if not work.done():  # the client left: its row leaves the engine
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
