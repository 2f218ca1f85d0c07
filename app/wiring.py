"""The composition root: the service built from settings, in one place.

The app's lifespan (app/main.py), the CLI (`lorag ask`, `prepare`, the index commands),
training and the benches all build through here, so each component is made one way and takes
its own config (`settings.engine`, `settings.decoding`, ...), never Settings itself.

    open_database(settings)        the replica's one PostgreSQL pool (LORAG_STORE=postgres)
    open_store(settings, fp, db)   the passage store LORAG_STORE names (FAISS folders, PostgreSQL)
    opened_store(settings, fp)     the same for one command (the CLI, training), closed after
    load_components(settings)      encoder, passage store, generator, adapter registry; warm-up
    build_service(settings, c)     decoder, step batch, engine (not started), RagService
    build_indexes(settings, c, s)  the IndexManager of document updates and compaction
    build_fleet(settings, c, s, i) the fleet's ledger (memory, or the database) and its follower
    running_service(settings)      all of it, started, for one-shot use (`lorag ask`, benches)
    prepare(settings)              first run: convert the default generator, build the demo index
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.contracts import GenRow, SearchMode
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.requests import Observers
from app.errors import IndexNotFound, InvalidInputError
from app.fleet.fleet import Fleet
from app.fleet.ledger import Ledger, LocalLedger
from app.generation.config import DecodingConfig, GeneratorSpec, PromptConfig
from app.generation.generator import Generator, sync_batched_lora
from app.generation.loading import load_generator, prepare_default_generator
from app.generation.step_batch import StepBatch
from app.lora.registry import AdapterRegistry
from app.lora.tasks import TaskBundles
from app.retrieval.ann import AnnSpec
from app.retrieval.builder import build_index, build_passage_index
from app.retrieval.encoders import TextEncoder
from app.retrieval.index_copy import fill
from app.retrieval.indexes import IndexCatalog
from app.retrieval.interface import PassageStore, Watched
from app.retrieval.manager import IndexManager
from app.retrieval.manifest import IndexOutdated
from app.retrieval.retriever import Retriever
from app.retrieval.store import PassageIndex
from app.service import RagService
from app.settings import DEFAULT, Settings

if TYPE_CHECKING:
    from app.db.pool import Database
    from app.metrics import Metrics

log = logging.getLogger(__name__)

DEMO_INDEX = "demo"
DEMO_SOURCE = Path("sources") / "demo.jsonl"  # under the index root, beside the built indexes


@dataclass
class Components:
    """The heavy parts, loaded once: what the service is composed of."""

    encoder: TextEncoder
    retriever: Retriever
    generator: Generator
    registry: AdapterRegistry
    load_seconds: dict[str, float]
    store: PassageStore  # the named indexes the retriever searches and /documents changes
    ledger: Ledger  # adapter registrations and the active index (the fleet's, with postgres)
    database: Database | None = None  # the pool the store and the fleet share (postgres)

    def close(self) -> None:
        """Close the store, then the database they share (the last step of a shutdown)."""
        self.store.close()
        if self.database is not None:
            self.database.close()


# loading ---------------------------------------------------------------------------------


def generator_of(spec: GeneratorSpec, prompts: PromptConfig | None = None) -> Generator:
    return load_generator(
        spec.spec,
        device=spec.device,
        dtype=spec.dtype,
        cache_dir=spec.cache_dir,
        prompt_config=prompts,
    )


def open_database(settings: Settings) -> Database | None:
    """The replica's one pool on LORAG_DATABASE_URL, which the passage store and the fleet's
    ledger share; None with LORAG_STORE=faiss. Blocks (connects): DatabaseUnavailable (503)
    names the server, never its password."""
    if settings.store != "postgres":
        return None
    config = settings.database
    if config is None:
        raise InvalidInputError("LORAG_STORE=postgres needs LORAG_DATABASE_URL")
    from app.db.pool import Database

    return Database.open(config)  # each user applies its own migrations (store 1xx, fleet 2xx)


def open_store(
    settings: Settings, fingerprint: str, database: Database | None = None
) -> PassageStore:
    """The passage store LORAG_STORE names, for the encoder `fingerprint`: the index folders
    under LORAG_INDEX_DIR (faiss), or the collections in `database` (postgres; the caller's, it
    outlives the store). Every caller (the server, the CLI, training) opens it here. Blocks
    (files, the database)."""
    if settings.store == "postgres":
        if database is None:
            raise InvalidInputError("LORAG_STORE=postgres: the store needs the database open")
        from app.retrieval.pg_store import PgStore

        return PgStore.open(
            database,
            fingerprint,
            active=settings.index_name,
            search=settings.pg_search,
            index=settings.pg_index,
        )
    return IndexCatalog(
        settings.index_dir,
        settings.index_name,
        fingerprint=fingerprint,
        search=settings.search,
    )


@contextmanager
def opened_store(settings: Settings, fingerprint: str) -> Iterator[PassageStore]:
    """open_store for one command (`lorag index ...`, training): with its own database
    connection when there is one, both closed on exit."""
    database = open_database(settings)
    try:
        store = open_store(settings, fingerprint, database)
        try:
            yield store
        finally:
            store.close()
    finally:
        if database is not None:
            database.close()


def load_components(settings: Settings) -> Components:
    """Load encoder, index and generator; refuse an index built with another encoder. The
    index loaded first is the fleet's active one where the ledger names one that the store
    holds (a replica restarted after `PUT /index` starts on what the fleet serves, even if its
    LORAG_INDEX_NAME was since deleted), else LORAG_INDEX_NAME."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    times: dict[str, float] = {}
    t = time.perf_counter()
    encoder = settings.encoder_spec.load()
    times["encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    database = open_database(settings)
    try:
        ledger = build_ledger(settings, database)
        store = open_store(settings, encoder.fingerprint, database)
        _start_on_the_fleets_index(store, ledger)
        retriever = Retriever(encoder, store)
        passages, _ = retriever.resolve(None).count()  # the active index loads now, or fails
    except BaseException:
        if database is not None:
            database.close()
        raise
    times["index"] = time.perf_counter() - t
    t = time.perf_counter()
    generator = generator_of(settings.generator_spec, settings.prompts)
    times["generator"] = time.perf_counter() - t
    registry = AdapterRegistry(
        generator,
        settings.adapters_dir,
        on_change=lambda model: sync_batched_lora(generator, model),
        policy=settings.residency,
    )
    t = time.perf_counter()
    _warm_up(retriever, generator, settings.retrieval)
    times["warm_up"] = time.perf_counter() - t
    log.info(
        "loaded encoder %s, %s index %s (%d passages), generator %s in %s",
        encoder.fingerprint,
        store.kind,
        store.active,
        passages,
        generator.model_id,
        {k: round(v, 2) for k, v in times.items()},
    )
    return Components(encoder, retriever, generator, registry, times, store, ledger, database)


def _start_on_the_fleets_index(store: PassageStore, ledger: Ledger) -> None:
    chosen = ledger.snapshot().active_index
    if chosen is None or chosen == store.active:
        return
    if chosen not in {info.name for info in store.list()}:
        log.error(
            "the fleet's active index %r is not in the store: starting on %r", chosen, store.active
        )
        return
    log.info("starting on the fleet's active index %r (LORAG_INDEX_NAME: %r)", chosen, store.active)
    store.activate(chosen)


def _warm_up(retriever: Retriever, generator: Generator, search: SearchMode = "dense") -> None:
    """One tiny pass through each model before /ready says yes, so the first request does not
    pay for lazy initialization (thread pools, kernel selection, tokenizer caches; the BM25
    index of a server whose default retrieval reads it)."""
    if search != "dense":
        retriever.retrieve(["warm-up"], 1, mode=search)
    hits = retriever.retrieve(["warm-up"], 1)[0]
    generator.generate([GenRow("warm-up", [h.passage for h in hits], None, 1)])


def prepare(settings: Settings, *, demo_source: Path | None = None) -> None:
    """First-run setup for the embedded default: convert the generator, build the demo index
    (a folder, or with LORAG_STORE=postgres a collection in the database)."""
    if settings.generator == DEFAULT:
        prepare_default_generator(settings.cache_dir)
    demo_source = demo_source or settings.index_dir / DEMO_SOURCE
    if settings.store == "postgres":
        _prepare_in_database(settings, demo_source)
        return
    try:
        PassageIndex.load(settings.index_path)
        return
    except IndexNotFound:
        if settings.index_name != DEMO_INDEX:
            raise
    except IndexOutdated as exc:  # built by an older lorag: the demo index is ours to rebuild
        if settings.index_name != DEMO_INDEX:
            raise
        log.warning("rebuilding the demo index: %s", exc)
    log.info("building the demo index from %s into %s", demo_source, settings.index_path)
    encoder = settings.encoder_spec.load()
    build_index([demo_source], encoder, settings.index_path, spec=settings.search)


def _prepare_in_database(settings: Settings, demo_source: Path) -> None:
    """The demo collection, built the first time, whole or not at all. Check, build and fill
    run under an advisory lock (DEMO_LOCK), so of replicas that start together one builds and
    the others wait, then find it built; the fill is one upsert (one transaction), so a reader
    sees the collection empty or whole, never part filled, and a build killed half way leaves
    it empty, built again by the next start."""
    from app.db.migrations import DEMO_LOCK
    from app.db.pool import advisory_lock

    encoder = settings.encoder_spec.load()
    with opened_store(settings, encoder.fingerprint) as store:
        assert settings.database is not None  # opened_store refused LORAG_STORE=postgres without
        with advisory_lock(settings.database, DEMO_LOCK):
            present = {info.name: info for info in store.list()}.get(settings.index_name)
            if present is not None and present.documents:
                return
            if settings.index_name != DEMO_INDEX:
                raise IndexNotFound(
                    f"no index {settings.index_name!r} in the database: build it with "
                    "`lorag index build --store postgres` or `lorag index copy`"
                )
            log.info("building the demo index from %s into the database", demo_source)
            demo = build_passage_index([demo_source], encoder, spec=AnnSpec("flat"))
            fill(store, DEMO_INDEX, demo, whole=True)


# composing -------------------------------------------------------------------------------


def _engine(
    generator: Generator,
    registry: AdapterRegistry,
    decoding: DecodingConfig,
    config: EngineConfig,
    metrics: Metrics | None,
) -> Engine:
    """The engine over one step batch: every request decodes there (app/generation/step_batch.py);
    with step batching off, or a model it cannot pad per row, batches start whole."""
    observers = Observers(
        on_batch=metrics.observe_batch if metrics else None,
        on_first_token=metrics.first_token.observe if metrics else None,
        on_token_gap=metrics.token_gap.observe if metrics else None,
    )
    return Engine(StepBatch(generator, decoding), registry, config, observers)


def build_service(
    settings: Settings, components: Components, metrics: Metrics | None = None
) -> RagService:
    """The RagService on loaded components; its engine is built, not started (engine.start()
    needs the running event loop)."""
    engine = _engine(
        components.generator, components.registry, settings.decoding, settings.engine, metrics
    )
    return RagService(
        components.retriever,
        engine,
        components.registry,
        request_timeout_s=settings.request_timeout_s,
        tasks=TaskBundles.for_encoder(settings.adapters_dir, components.encoder),
        default_top_k=settings.top_k,
        default_mode=settings.mode,
        default_search=settings.retrieval,
        scorer=components.generator,
        abstain=settings.abstention,
        prompts=settings.prompts,
        check_citations=settings.check_citations,
    )


def build_indexes(
    settings: Settings,
    components: Components,
    service: RagService,
    metrics: Metrics | None = None,
) -> IndexManager:
    """Document updates and compaction on the store; embedding runs on the service's
    retrieval thread, where the encoder already runs."""
    if metrics is not None and isinstance(components.store, Watched):
        components.store.watch(metrics.observe_index)
    return IndexManager(
        components.store,
        components.encoder,
        service.in_retrieval_thread,
        limits=settings.update_limits,
        compaction=settings.compaction,
    )


def build_ledger(settings: Settings, database: Database | None) -> Ledger:
    """Where adapter registrations and the active index live: this process's memory with the
    embedded store (one process), the database every replica shares with LORAG_STORE=postgres
    (`database`, the pool the passage store uses too; the caller closes it). Blocks (migrates):
    call it off the event loop."""
    if database is None:
        return LocalLedger()
    from app.fleet.pg_ledger import FLEET_MIGRATIONS, PostgresLedger

    database.migrate(FLEET_MIGRATIONS)
    return PostgresLedger(database, recheck_s=settings.fleet_recheck_s)


def build_fleet(service: RagService, indexes: IndexManager, ledger: Ledger) -> Fleet:
    """The follower of the ledger; fleet.start() applies it, on the running event loop."""
    return Fleet(service, indexes, ledger)


@asynccontextmanager
async def running_service(
    settings: Settings, components: Components | None = None
) -> AsyncIterator[RagService]:
    """A started RagService without a server (`lorag ask`, benches): the models load in a
    worker thread, the engine runs on this event loop and is stopped, its queue answered, on
    exit."""
    owned = components is None
    if components is None:
        components = await asyncio.to_thread(load_components, settings)
    service = build_service(settings, components)
    service.engine.start()
    try:
        yield service
    finally:
        await service.engine.stop()
        service.close()
        if owned:
            components.close()
