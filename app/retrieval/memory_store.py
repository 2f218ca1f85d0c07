"""One PassageIndex held in memory, as a one-collection PassageStore: what a retriever over an
index that has no folder to write (a freshly built one, a test's, training's reference) takes.

It searches and reads; it refuses changes by name, since nothing here could make them durable
(an index folder is a LiveIndex in an IndexCatalog).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.contracts import Hit
from app.errors import IndexNotFound, InvalidInputError
from app.retrieval.docstore import StoredDocument
from app.retrieval.filters import MetadataFilter
from app.retrieval.interface import CollectionInfo, SearchMode, StoreKind, Upserted
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Prepared

MEMORY = "memory"  # the collection's name unless given one


class IndexCollection:
    """A Collection over one in-memory PassageIndex; read-only."""

    def __init__(self, index: PassageIndex, name: str = MEMORY) -> None:
        self.index = index
        self.name = name

    def search(
        self,
        queries: np.ndarray | None,  # [n, dim] float32; dense and hybrid
        k: int,
        where: MetadataFilter | None = None,
        *,
        mode: SearchMode = "dense",
        texts: Sequence[str] | None = None,  # the questions; sparse and hybrid
    ) -> list[list[Hit]]:
        return self.index.search(queries, k, where, mode=mode, texts=texts)

    def upsert(self, prepared: Prepared) -> list[Upserted]:
        raise self._read_only()

    def delete(self, doc_ids: Sequence[str]) -> None:
        raise self._read_only()

    def document(self, doc_id: str) -> StoredDocument | None:
        return self.index.document(doc_id)

    def count(self) -> tuple[int, int]:
        return len(self.index), self.index.document_count

    def describe(self) -> CollectionInfo:
        manifest = self.index.manifest
        return CollectionInfo(
            name=self.name,
            kind="faiss",
            encoder=manifest.encoder,
            dim=manifest.dim,
            passages=len(self.index),
            documents=self.index.document_count,
            index_type=manifest.index_type,
            active=True,
            chunk_words=manifest.chunk_words,
        )

    def _read_only(self) -> InvalidInputError:
        return InvalidInputError(
            f"index {self.name!r} is held in memory only: it cannot be changed (open its folder "
            "through an IndexCatalog to change it)"
        )


class MemoryStore:
    """A PassageStore of exactly one in-memory collection, always the active one."""

    kind: StoreKind = "faiss"

    def __init__(self, index: PassageIndex, name: str = MEMORY) -> None:
        self._collection = IndexCollection(index, name)
        self.fingerprint = index.manifest.encoder

    @property
    def active(self) -> str:
        return self._collection.name

    def get(self, name: str | None = None) -> IndexCollection:
        if name is not None and name != self._collection.name:
            raise IndexNotFound(
                f"index {name!r} asked for, but this store holds one index, "
                f"{self._collection.name!r}"
            )
        return self._collection

    def create(self, name: str, *, dim: int, chunk_words: int = 100) -> IndexCollection:
        collection = self.get(name)
        if dim != collection.index.dim:
            raise InvalidInputError(f"index {name!r} is {collection.index.dim}-d, not {dim}-d")
        return collection

    def activate(self, name: str) -> IndexCollection:
        return self.get(name)

    def list(self) -> list[CollectionInfo]:
        return [self._collection.describe()]

    def close(self) -> None:
        pass
