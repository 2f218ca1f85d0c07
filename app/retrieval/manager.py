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

from app.retrieval.docstore import StoredDocument
from app.retrieval.encoders import TextEncoder
from app.retrieval.indexes import IndexCatalog, IndexInfo
from app.retrieval.live import LiveIndex, Upserted
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
    def __init__(
        self,
        catalog: IndexCatalog,
        encoder: TextEncoder,
        run_encoder: RunsEncoder,
        *,
        limits: UpdateLimits = UpdateLimits(),
        compaction: CompactionPolicy = CompactionPolicy(),
    ) -> None:
        self.catalog = catalog
        self.encoder = encoder
        self._run_encoder = run_encoder
        self.limits = limits
        self.compaction = compaction
        self._background: set[asyncio.Task[None]] = set()

    async def index(self, name: str | None) -> LiveIndex:
        return await asyncio.to_thread(self.catalog.get, name)

    async def upsert(self, documents: Sequence[Document], index: str | None) -> list[Upserted]:
        validate(documents, self.limits)
        live = await self.index(index)
        words = live.index.manifest.chunk_words
        prepared = await self._run_encoder(lambda: prepare(documents, self.encoder, words=words))
        outcome = await asyncio.to_thread(live.upsert, prepared)
        self._after_change(live)
        return outcome

    async def delete(self, doc_id: str, index: str | None) -> None:
        live = await self.index(index)
        await asyncio.to_thread(live.delete, [doc_id])
        self._after_change(live)

    async def document(self, doc_id: str, index: str | None) -> StoredDocument | None:
        live = await self.index(index)
        return live.index.document(doc_id)

    async def compact(self, index: str | None) -> bool:
        live = await self.index(index)
        done = await asyncio.to_thread(live.compact)
        self.catalog.changed(live)
        return done

    async def activate(self, name: str) -> LiveIndex:
        return await asyncio.to_thread(self.catalog.activate, name)

    async def list(self) -> list[IndexInfo]:
        return await asyncio.to_thread(self.catalog.list)

    def _after_change(self, live: LiveIndex) -> None:
        self.catalog.changed(live)
        policy = self.compaction
        if not live.compaction_due(
            max_bytes=policy.max_log_bytes, max_records=policy.max_log_records
        ):
            return
        task = asyncio.create_task(self._compact_in_background(live))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _compact_in_background(self, live: LiveIndex) -> None:
        try:
            await asyncio.to_thread(live.compact)
            self.catalog.changed(live)
        except Exception:  # the log still holds everything; the next trigger tries again
            logger.exception("background compaction of %s failed", live.path)

    async def close(self) -> None:
        """Wait for background compactions, then compact what is pending (shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background))
        await asyncio.to_thread(self.catalog.close)
