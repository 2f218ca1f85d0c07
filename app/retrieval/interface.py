"""The passage store interface: what the retriever, /documents, /index, the CLI and training
may ask of a store, whatever engine holds the passages (FAISS folders, PostgreSQL+pgvector).

Callers hold a `PassageStore` (the catalog of named indexes) and a `Collection` (one named
index) and never branch on the engine. Search takes a batch of query vectors and a metadata
filter (app/retrieval/filters.py, the same semantics in every store); `mode` leaves room for a
sparse (BM25) and a hybrid search beside the dense one: a store that cannot serve a mode
refuses it by name (InvalidInputError), it never falls back silently.

Status: the contract. The FAISS store (IndexCatalog/LiveIndex/PassageIndex) and the Postgres
store are being moved behind it; until then the retriever still takes a PassageIndex or an
IndexCatalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from app.contracts import Hit, SearchMode  # SearchMode: dense, sparse, hybrid
from app.retrieval.docstore import StoredDocument
from app.retrieval.filters import MetadataFilter
from app.retrieval.live import Upserted
from app.retrieval.updates import Prepared

StoreKind = Literal["faiss", "postgres"]


@dataclass(frozen=True)
class CollectionInfo:
    """describe(): what a named index is, for /index, the CLI and the encoder check."""

    name: str
    kind: StoreKind
    encoder: str  # the encoder fingerprint its vectors were made with
    dim: int
    passages: int
    documents: int
    index_type: str  # "IDMap2,HNSW32,Flat IP", "hnsw vector_ip_ops m=16", ...
    active: bool


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
