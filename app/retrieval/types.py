"""Plain value types shared by retrieval, generation and the API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable unit: about 100 words of a document (the RAG paper's unit)."""

    id: str  # "<doc_id>#<chunk number>", unique in an index
    doc_id: str  # the source document's id
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved passage and its retrieval score (inner product of the embeddings)."""

    passage: Passage
    score: float
