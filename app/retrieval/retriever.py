"""Questions in, top-k passages out: the encoder and the passage store it searches."""

from __future__ import annotations

from collections.abc import Sequence

from app.contracts import Hit, SearchMode
from app.errors import IndexInvalid, InvalidInputError
from app.retrieval.encoders import TextEncoder
from app.retrieval.filters import MetadataFilter
from app.retrieval.interface import Collection, PassageStore


class Retriever:
    """Searches the named collections of a PassageStore (the active one unless a call names
    another). A single in-memory PassageIndex is a MemoryStore (app/retrieval/memory_store.py)."""

    def __init__(self, encoder: TextEncoder, store: PassageStore) -> None:
        # the store checks each collection it opens against its fingerprint; this checks the store
        if encoder.fingerprint != store.fingerprint:
            raise IndexInvalid(
                f"index was built with encoder {store.fingerprint!r}, "
                f"but the retriever uses encoder {encoder.fingerprint!r}"
            )
        self.encoder = encoder
        self.store = store

    def resolve(self, name: str | None) -> Collection:
        """The collection a call searches (the active one for None), resolved once per call."""
        return self.store.get(name)

    def retrieve(
        self,
        questions: Sequence[str],
        k: int,
        *,
        index: str | None = None,
        where: MetadataFilter | None = None,
        mode: SearchMode = "dense",
    ) -> list[list[Hit]]:
        """For each question, its k best passages (fewer if the index is smaller), best first.

        `index` names one of the store's collections (default: the active one); it is resolved
        once, before encoding, so a concurrent switch cannot split this call. `where`: only passages
        of documents whose metadata matches (app/retrieval/filters.py).
        `mode`: dense (the encoder's vectors), sparse (BM25 of the words; nothing is encoded) or
        hybrid (both, fused by reciprocal rank)."""
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        if isinstance(questions, str):
            raise InvalidInputError("questions must be a sequence of strings, not one string")
        target = self.resolve(index)
        if not questions:
            return []
        texts = list(questions)
        if mode == "sparse":
            return target.search(None, k, where, mode=mode, texts=texts)
        vectors = self.encoder.encode_questions(questions)  # [n, dim]
        return target.search(vectors, k, where, mode=mode, texts=texts)
