"""create_app(settings) and the lifespan that builds everything.

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

from app import __version__
from app.api import adapters, ask, documents, health, index
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.bootstrap import load_components
from app.engine.engine import Engine
from app.generation.backends import Generator
from app.generation.decoding import RagDecoder
from app.generation.stepping import StepBatch, step_support
from app.lora.tasks import TaskBundles
from app.metrics import Metrics
from app.retrieval.manager import IndexManager
from app.service import RagService
from app.settings import Settings
from app.state import AppState

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    settings = settings or Settings()
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
            if state.indexes is not None:  # folds update logs into snapshots
                await state.indexes.close()
            if state.service is not None:
                await state.service.engine.stop()
                state.service.close()

    app = FastAPI(
        title="lorag",
        version=__version__,
        summary="Retrieval-augmented generation with hot-swappable per-task LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.lorag = state
    # added last = outermost: the request id and metrics see every response, 413s included
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
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
    return app


def _step_batch(generator: Generator, settings: Settings) -> StepBatch | None:
    """The step batch for generator, or None (whole batches) where it cannot step exactly."""
    why = step_support(generator)
    if why is not None:
        log.warning("step-level batching off for %s: %s", generator.model_id, why)
        return None
    # RAG-Token steps with or without beams; RAG-Sequence with beams runs whole, in RagDecoder
    return StepBatch(generator, min_prior=settings.min_prior, num_beams=settings.num_beams)


async def _load(state: AppState, on_failure: Callable[[str], None] | None) -> None:
    settings = state.settings
    try:
        components = await asyncio.to_thread(load_components, settings)
    except Exception as exc:
        state.status = "failed"
        state.error = f"{type(exc).__name__}: {exc}"
        log.error("startup failed: %s", state.error)
        state.loaded.set()
        if on_failure is not None:
            on_failure(state.error)
        return
    decoder = RagDecoder(
        components.generator, num_beams=settings.num_beams, min_prior=settings.min_prior
    )
    engine = Engine(
        decoder,
        components.registry,
        max_batch_size=settings.max_batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        expect_wait_ms=settings.expect_wait_ms,
        on_batch=state.metrics.observe_batch,
        stepper=_step_batch(components.generator, settings) if settings.step_batching else None,
        prefill_tokens_per_step=settings.prefill_tokens_per_step,
        on_first_token=state.metrics.first_token.observe,
        on_token_gap=state.metrics.token_gap.observe,
    )
    engine.start()
    state.components = components
    state.service = RagService(
        components.retriever,
        engine,
        components.registry,
        request_timeout_s=settings.request_timeout_s,
        tasks=TaskBundles.for_encoder(settings.adapters_dir, components.encoder),
        default_top_k=settings.top_k,
        default_mode=settings.mode,
    )
    state.indexes = IndexManager.from_settings(
        components.catalog, components.encoder, state.service.in_retrieval_thread, settings
    )
    components.catalog.watch(state.metrics.observe_index)
    if state.status == "loading":
        state.status = "ready"
        log.info("ready")
    state.loaded.set()
