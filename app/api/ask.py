"""POST /ask: retrieve, generate, cite."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import ApiDep, ServiceDep, StateDep
from app.api.disconnect import unless_disconnected
from app.api.schemas import AskRequest, AskResponse, PassageOut, Timings
from app.service import AskParams

router = APIRouter(tags=["ask"])


@router.post("/ask", response_model=AskResponse, dependencies=[ApiDep])
async def ask(
    body: AskRequest, request: Request, service: ServiceDep, state: StateDep
) -> AskResponse:
    settings = state.settings
    params = AskParams(
        question=body.question,
        adapter=body.adapter,
        top_k=body.top_k,  # None: the adapter's task default, else settings.top_k
        max_new_tokens=body.max_new_tokens or settings.max_new_tokens,
        mode=body.mode,  # None: the adapter's task default, else settings.mode
        decoding=body.decoding,
        index=body.index,
    )
    # a client that leaves takes its row out of the engine's queue (app/api/disconnect.py)
    result = await unless_disconnected(request, service.ask(params))
    labels = (body.adapter or "__base__", result.mode)
    state.metrics.ask_latency.labels(*labels).observe(result.timings_ms["total"] / 1000)
    state.metrics.generated_tokens.labels(*labels).inc(result.generated_tokens)
    return AskResponse(
        answer=result.answer,
        adapter=result.adapter,
        adapter_version=result.adapter_version,
        mode=result.mode,
        passages=[
            PassageOut(
                id=h.passage.id,
                doc_id=h.passage.doc_id,
                title=h.passage.title,
                text=h.passage.text,
                score=h.score,
                weight=w,
            )
            for h, w in zip(result.hits, result.weights, strict=True)
        ],
        timings_ms=Timings(**result.timings_ms),
        generated_tokens=result.generated_tokens,
        request_id=request.state.request_id,
    )
