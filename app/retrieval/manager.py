"""Index administration for the server: document updates, compaction, the active index.

The one place that decides which thread does what, so routes stay thin:

    validation           on the event loop (cheap; refuses the whole request, naming the document)
    loading an index     a worker thread (files and log replay)
    chunk + embed        the service's retrieval thread (`run_encoder`): the encoder is not
                         thread-safe and /ask's question encoding runs there too
    log + apply          a worker thread, under the index's writer lock (an fsync per request)
    compaction           a worker thread, after the response once the log passes its limits;
                         on shutdown; or on demand

Updates to one index serialize on its writer lock; /ask keeps reading during all of it and sees
each update whole, from the moment it is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from app.errors import LoragError
from app.retrieval.docstore import StoredDocument
from app.retrieval.encoders import TextEncoder
from app.retrieval.interface import (
    Collection,
    CollectionInfo,
    Compacts,
    PassageStore,
    Upserted,
    Watched,
)
from app.retrieval.updates import Document, UpdateLimits, prepare, validate

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RunsEncoder(Protocol):
    """Runs a function where the encoder may run (RagService.in_retrieval_thread)."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


@dataclass(frozen=True)
class CompactionPolicy:
    max_log_bytes: int = 64 * 1024 * 1024
    max_log_records: int = 1000


class IndexManager:
    """Document updates and the active index on a PassageStore, whatever its engine; a
    collection that `Compacts` (FAISS) is compacted by `compaction`'s policy."""

    def __init__(
        self,
        store: PassageStore,
        encoder: TextEncoder,
        run_encoder: RunsEncoder,
        *,
        limits: UpdateLimits = UpdateLimits(),
        compaction: CompactionPolicy = CompactionPolicy(),
    ) -> None:
        self.store = store
        self.encoder = encoder
        self._run_encoder = run_encoder
        self.limits = limits
        self.compaction = compaction
        self._background: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> str:
        return self.store.active

    async def index(self, name: str | None) -> Collection:
        return await asyncio.to_thread(self.store.get, name)

    async def upsert(self, documents: Sequence[Document], index: str | None) -> list[Upserted]:
        validate(documents, self.limits)
        collection = await self.index(index)
        words = (await asyncio.to_thread(collection.describe)).chunk_words
        prepared = await self._run_encoder(lambda: prepare(documents, self.encoder, words=words))
        outcome = await asyncio.to_thread(collection.upsert, prepared)
        self._after_change(collection)
        return outcome

    async def delete(self, doc_id: str, index: str | None) -> None:
        collection = await self.index(index)
        await asyncio.to_thread(collection.delete, [doc_id])
        self._after_change(collection)

    async def document(self, doc_id: str, index: str | None) -> StoredDocument | None:
        collection = await self.index(index)
        return await asyncio.to_thread(collection.document, doc_id)

    async def compact(self, index: str | None) -> bool:
        """Fold the collection's log into a snapshot; False when there is nothing to fold (a
        store without a log never has)."""
        collection = await self.index(index)
        if not isinstance(collection, Compacts):
            return False
        return await asyncio.to_thread(collection.compact)

    async def activate(self, name: str) -> Collection:
        return await asyncio.to_thread(self.store.activate, name)

    async def refresh(self) -> None:
        """The store's size gauges again, if it reports them (Watched): what another replica
        changed (the fleet's re-check calls it)."""
        if isinstance(self.store, Watched):
            await asyncio.to_thread(self.store.refresh)

    async def list(self) -> list[CollectionInfo]:
        return await asyncio.to_thread(self.store.list)

    def _after_change(self, collection: Collection) -> None:
        if not isinstance(collection, Compacts):
            return
        policy = self.compaction
        if not collection.compaction_due(
            max_bytes=policy.max_log_bytes, max_records=policy.max_log_records
        ):
            return
        task = asyncio.create_task(self._compact_in_background(collection))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _compact_in_background(self, collection: Compacts) -> None:
        try:
            await asyncio.to_thread(collection.compact)
        except Exception:  # the log still holds everything; the next trigger tries again
            logger.exception("background compaction failed; its log is kept")

    async def close(self) -> None:
        """Wait for background compactions, then compact what is pending (shutdown; the store
        is closed by whoever opened it)."""
        if self._background:
            await asyncio.wait(list(self._background))
        await asyncio.to_thread(self._compact_pending)

    def _compact_pending(self) -> None:
        """Fold pending log records into snapshots; errors are logged, not raised: the log
        already holds every acknowledged change."""
        try:
            infos = self.store.list()
        except LoragError as exc:  # a database that is down: there is no log of ours to fold
            logger.warning("no compaction at shutdown: %s", exc)
            return
        for info in infos:
            if not (info.loaded and info.pending_updates):
                continue
            collection = self.store.get(info.name)
            if isinstance(collection, Compacts):
                try:
                    collection.compact()
                except Exception:
                    logger.exception("compacting %s at shutdown failed; its log is kept", info.name)
