"""Liveness, readiness, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import StateDep
from app.api.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Alive: the process answers. Says nothing about models."""
    return Health(status="ok")


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(state: StateDep) -> JSONResponse:
    """Ready: encoder, index and generator are loaded, the engine accepts requests, and the
    database (with LORAG_STORE=postgres) answers; 503 says why not."""
    problem = state.fleet.problem() if state.fleet is not None else None
    if state.status == "ready" and problem is not None:
        body = Ready(status="unavailable", detail=problem)
        return JSONResponse(body.model_dump(), status_code=503)
    body = Ready(status=state.status, detail=state.error)
    code = 200 if state.status == "ready" else 503
    return JSONResponse(body.model_dump(), status_code=code)


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    if state.service is not None:
        state.metrics.queue_depth.set(state.service.engine.queue_depth)
        state.metrics.running_rows.set(state.service.engine.running_rows)
        state.metrics.observe_prefixes(state.service.engine.prefixes)
        state.metrics.observe_registry(state.service.registry)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
