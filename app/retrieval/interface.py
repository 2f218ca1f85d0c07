"""The passage store interface: what the retriever, /documents, /index, the CLI and training
may ask of a store, whatever engine holds the passages (FAISS folders, PostgreSQL+pgvector).

Callers hold a `PassageStore` (the catalog of named indexes) and a `Collection` (one named
index) and never branch on the engine. Search takes a batch of query vectors and a metadata
filter (app/retrieval/filters.py, the same semantics in every store) and a `mode`: dense,
sparse (BM25) or hybrid, which every store answers through fusion.search_by_mode (the same
checks, depth and RRF fusion); a store that cannot serve a mode refuses it by name
(InvalidInputError), it never falls back silently.

Optional capabilities: a store or collection may offer more than the contract (FAISS folds its
update log into snapshots); a caller that wants it asks for the capability (`Compacts`,
`LoadsInBulk`, `Watched` below, runtime-checkable protocols), never for a kind of store.

Status: the FAISS store implements it (IndexCatalog is its PassageStore, LiveIndex its
Collection; app/retrieval/memory_store.py wraps one in-memory PassageIndex), and the retriever,
IndexManager (/documents, /index), the CLI and training use only this interface. The Postgres
store (app/retrieval/pg_store.py) is being written behind it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from app.contracts import Hit, SearchMode  # SearchMode: dense, sparse, hybrid
from app.errors import NotFoundError
from app.retrieval.docstore import StoredDocument
from app.retrieval.filters import MetadataFilter
from app.retrieval.updates import Prepared

StoreKind = Literal["faiss", "postgres"]


@dataclass(frozen=True)
class CollectionInfo:
    """describe(): what a named index is, for /index, the CLI and the encoder check."""

    name: str
    kind: StoreKind
    encoder: str  # the encoder fingerprint its vectors were made with
    dim: int
    passages: int | None  # None only while not loaded (below)
    documents: int | None
    index_type: str  # "IDMap2,HNSW32,Flat IP", "hnsw vector_ip_ops m=16", ...
    active: bool
    chunk_words: int = 100  # words per passage: documents added later are chunked alike
    # extras of a store that loads lazily or keeps a log (FAISS): a collection not loaded yet
    # reports loaded=False and no sizes (None); pending_updates: log records not yet compacted
    loaded: bool = True
    pending_updates: int | None = None


class DocumentNotFound(NotFoundError):
    """delete() of an id the collection lacks (404), from any store."""

    def __init__(self, doc_id: str, index: str) -> None:
        super().__init__(f"document {doc_id!r} is not in index {index!r}")
        self.doc_id = doc_id


@dataclass(frozen=True)
class Upserted:
    """upsert()'s outcome for one document."""

    doc_id: str
    passages: int
    replaced: bool


class Collection(Protocol):
    """One named index. Every method may block (files, network): call it off the event loop."""

    name: str

    def search(
        self,
        queries: np.ndarray | None,  # [n, dim] float32; dense and hybrid
        k: int,
        where: MetadataFilter | None = None,
        *,
        mode: SearchMode = "dense",
        texts: Sequence[str] | None = None,  # the n questions' texts; sparse and hybrid
    ) -> list[list[Hit]]:
        """Top-k per query row, best first, only passages matching `where` (k of them when
        k exist); fewer when the collection holds fewer. dense ranks by the vectors' inner
        product, sparse by BM25 of the texts (only passages sharing a term with the question;
        the score is BM25's), hybrid fuses the two by app/retrieval/fusion.py's rrf (the score
        is the RRF score)."""
        ...

    def upsert(self, prepared: Prepared) -> list[Upserted]:
        """Add or replace whole documents, all or none, durably (acknowledged on return)."""
        ...

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Delete whole documents, all or none; an unknown id refuses the lot."""
        ...

    def document(self, doc_id: str) -> StoredDocument | None: ...

    def count(self) -> tuple[int, int]:
        """(passages, documents)."""
        ...

    def describe(self) -> CollectionInfo: ...


class PassageStore(Protocol):
    """The named indexes of one store and which one is active."""

    kind: StoreKind
    fingerprint: str  # the encoder every collection must have been built with

    @property
    def active(self) -> str: ...

    def get(self, name: str | None = None) -> Collection:
        """The named collection (the active one for None); IndexNotFound naming the known
        ones; IndexInvalid naming both fingerprints for another encoder's index."""
        ...

    def create(self, name: str, *, dim: int, chunk_words: int = 100) -> Collection:
        """The named collection, created empty with this store's encoder if it is absent."""
        ...

    def activate(self, name: str) -> Collection: ...

    def list(self) -> list[CollectionInfo]: ...

    def close(self) -> None: ...


class IndexObserver(Protocol):
    """Told a collection's size after it loads or changes (the metrics gauges)."""

    def __call__(self, name: str, passages: int, pending: int, *, active: bool) -> None: ...


@runtime_checkable
class Compacts(Protocol):
    """Optional, of a Collection: an update log folded into snapshots (FAISS). IndexManager's
    compaction policy and /index/{name}/compact reach it only through this."""

    def compaction_due(self, *, max_bytes: int, max_records: int) -> bool: ...

    def compact(self) -> bool:
        """Fold the log into a snapshot; False if there was nothing to fold."""
        ...


@runtime_checkable
class LoadsInBulk(Protocol):
    """Optional, of a Collection: a first load into an empty collection, all or none, faster
    than upserts (PostgreSQL: COPY with no index to keep up, then the HNSW index built once).
    `lorag index copy`, `lorag index build --store` and the demo's preparation use it
    (app/retrieval/index_copy.py)."""

    def load(self, batches: Iterable[Prepared]) -> int:
        """Every batch's documents, in one transaction; the passages loaded. InvalidInputError
        if the collection holds documents already."""
        ...


@runtime_checkable
class Watched(Protocol):
    """Optional, of a PassageStore: reports every collection's size as it changes."""

    def watch(self, observer: IndexObserver) -> None: ...

    def refresh(self) -> None:
        """Report the sizes again, for changes another process made (the fleet's re-check)."""
        ...
