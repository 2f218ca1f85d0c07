"""Questions in, top-k passages out: the encoder and the index (or named indexes) it searches."""

from __future__ import annotations

from collections.abc import Sequence

from app.contracts import Hit
from app.errors import IndexInvalid, InvalidInputError
from app.retrieval.encoders import TextEncoder
from app.retrieval.filters import MetadataFilter
from app.retrieval.indexes import IndexCatalog
from app.retrieval.store import PassageIndex


class Retriever:
    """Searches one PassageIndex, or the named indexes of an IndexCatalog (the active one
    unless a call names another)."""

    def __init__(self, encoder: TextEncoder, index: PassageIndex | IndexCatalog) -> None:
        # PassageIndex.load(expect_fingerprint=...) checks this too; this covers in-memory indexes
        built_with = (
            index.fingerprint if isinstance(index, IndexCatalog) else index.manifest.encoder
        )
        if encoder.fingerprint != built_with:
            raise IndexInvalid(
                f"index was built with encoder {built_with!r}, "
                f"but the retriever uses encoder {encoder.fingerprint!r}"
            )
        self.encoder = encoder
        self._source = index

    @property
    def catalog(self) -> IndexCatalog | None:
        return self._source if isinstance(self._source, IndexCatalog) else None

    @property
    def index(self) -> PassageIndex:
        """The index a call without a name searches now."""
        return self.resolve(None)

    def resolve(self, name: str | None) -> PassageIndex:
        if isinstance(self._source, IndexCatalog):
            return self._source.resolve(name)
        if name is not None:
            raise InvalidInputError(f"index {name!r} asked for, but this retriever has one index")
        return self._source

    def retrieve(
        self,
        questions: Sequence[str],
        k: int,
        *,
        index: str | None = None,
        where: MetadataFilter | None = None,
    ) -> list[list[Hit]]:
        """For each question, its k best passages (fewer if the index is smaller), best first.

        `index` names one of the catalog's indexes (default: the active one); it is resolved
        once, before encoding, so a concurrent switch cannot split this call. `where`: only passages
        of documents whose metadata matches (app/retrieval/filters.py)."""
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        if isinstance(questions, str):
            raise InvalidInputError("questions must be a sequence of strings, not one string")
        target = self.resolve(index)
        if not questions:
            return []
        vectors = self.encoder.encode_questions(questions)  # [n, dim]
        return target.search(vectors, k, where)
