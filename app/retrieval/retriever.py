"""Questions in, top-k passages out: the encoder and the index it was built with."""

from __future__ import annotations

from collections.abc import Sequence

from app.errors import IndexInvalid, InvalidInputError
from app.retrieval.encoders import TextEncoder
from app.retrieval.store import PassageIndex
from app.retrieval.types import Hit


class Retriever:
    def __init__(self, encoder: TextEncoder, index: PassageIndex) -> None:
        # PassageIndex.load(expect_fingerprint=...) checks this too; this covers in-memory indexes
        if encoder.fingerprint != index.manifest.encoder:
            raise IndexInvalid(
                f"index was built with encoder {index.manifest.encoder!r}, "
                f"but the retriever uses encoder {encoder.fingerprint!r}"
            )
        self.encoder = encoder
        self.index = index

    def retrieve(self, questions: Sequence[str], k: int) -> list[list[Hit]]:
        """For each question, its k best passages (fewer if the index is smaller), best first."""
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        if isinstance(questions, str):
            raise InvalidInputError("questions must be a sequence of strings, not one string")
        if not questions:
            return []
        vectors = self.encoder.encode_questions(questions)  # [n, dim]
        return self.index.search(vectors, k)
