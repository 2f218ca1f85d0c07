"""create_app(settings) and its lifespan, which builds the service through app/wiring.py.

Models load in a worker thread after the server starts listening, so `/health` answers
at once and `/ready` says 503 (with the stage) until the encoder, index and generator are
in memory. A load that fails (say, an index built with another encoder) leaves the app
not ready with the reason in `/ready`; `lorag serve` then exits non-zero with that reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__, wiring
from app.api import adapters, ask, documents, health, index, openai
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.metrics import Metrics
from app.settings import Settings
from app.state import AppState

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    settings = settings or Settings()
    security = settings.security
    state = AppState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state, on_load_failure))
        try:
            yield
        finally:
            state.status = "stopping"
            if not loader.done():
                await asyncio.wait([loader])
            if state.fleet is not None:  # stop following before the engine stops
                await state.fleet.stop()
            if state.indexes is not None:  # folds update logs into snapshots
                await state.indexes.close()
            if state.service is not None:
                await state.service.engine.stop()
                state.service.close()
            if state.components is not None:  # the store, then the database all of them used
                await asyncio.to_thread(state.components.close)

    app = FastAPI(
        title="lorag",
        version=__version__,
        summary="Retrieval-augmented generation with hot-swappable per-task LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.lorag = state
    # added last = outermost: the request id and metrics see every response, 413s included
    app.add_middleware(BodyLimitMiddleware, max_bytes=security.max_body_bytes)
    if security.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(security.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["authorization", "content-type", "x-request-id"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    app.include_router(ask.router)
    app.include_router(adapters.router)
    app.include_router(documents.router)
    app.include_router(index.router)
    app.include_router(health.router)
    app.include_router(openai.router)
    return app


async def _load(state: AppState, on_failure: Callable[[str], None] | None) -> None:
    """Load in a worker thread, then compose the service through app/wiring.py and start it."""
    settings = state.settings
    components = None
    try:
        components = await asyncio.to_thread(wiring.load_components, settings)
    except Exception as exc:
        if components is not None:
            await asyncio.to_thread(components.close)
        state.status = "failed"
        state.error = f"{type(exc).__name__}: {exc}"
        log.error("startup failed: %s", state.error)
        state.loaded.set()
        if on_failure is not None:
            on_failure(state.error)
        return
    service = wiring.build_service(settings, components, state.metrics)
    service.engine.start()
    state.components = components
    state.service = service
    state.indexes = wiring.build_indexes(settings, components, service, state.metrics)
    fleet = wiring.build_fleet(service, state.indexes, components.ledger)
    await fleet.start()  # what the fleet registered is applied here before /ready says yes
    state.fleet = fleet
    if state.status == "loading":
        state.status = "ready"
        log.info("ready")
    state.loaded.set()
