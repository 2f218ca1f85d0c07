"""Documents in, passages and vectors out: the checks and the work before an index update.

Validation happens first and names the bad document, so a request is refused whole before any
encoder time is spent. `prepare` chunks with the index's own passage length (the manifest's
`chunk_words`) and embeds every passage of the request in one encoder call (the encoder sorts
by length and batches). It holds no lock and touches no index: the caller runs it where the
encoder may run (the service's one retrieval thread, as the encoder is not thread-safe), then
hands the result to LiveIndex.upsert, which logs and applies it under the writer lock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from app.contracts import Passage
from app.errors import InvalidInputError
from app.retrieval.chunking import chunk_document

if TYPE_CHECKING:  # importing the encoders pulls in torch; the CLI and tests' workers need not
    from app.retrieval.encoders import TextEncoder

MAX_ID_CHARS = 256


@dataclass(frozen=True)
class Document:
    """A document to add or replace (from POST /documents, or a source file for the CLI)."""

    id: str
    title: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateLimits:
    max_documents: int = 64  # per request
    max_chars: int = 200_000  # per document text


@dataclass(frozen=True)
class Prepared:
    """Chunked and embedded documents, ready for LiveIndex.upsert."""

    fingerprint: str  # the encoder that made the vectors
    documents: list[tuple[Document, list[Passage]]]
    vectors: np.ndarray  # [total passages, dim] float32, in document then passage order


def validate(documents: Sequence[Document], limits: UpdateLimits) -> None:
    """Refuse the whole batch, naming the first bad document."""
    if not documents:
        raise InvalidInputError("no documents given")
    if len(documents) > limits.max_documents:
        raise InvalidInputError(
            f"{len(documents)} documents in one request, at most {limits.max_documents}"
        )
    seen: set[str] = set()
    for i, doc in enumerate(documents):
        where = f"document {i} ({doc.id!r})"
        if not doc.id or not doc.id.strip():
            raise InvalidInputError(f"document {i}: id is empty")
        if len(doc.id) > MAX_ID_CHARS:
            raise InvalidInputError(f"document {i}: id is longer than {MAX_ID_CHARS} characters")
        if any(ord(c) < 32 for c in doc.id):
            raise InvalidInputError(f"{where}: id contains a control character")
        if doc.id in seen:
            raise InvalidInputError(f"{where}: id occurs twice in the request")
        seen.add(doc.id)
        if not doc.text.strip():
            raise InvalidInputError(f"{where}: text is empty")
        if len(doc.text) > limits.max_chars:
            raise InvalidInputError(
                f"{where}: text has {len(doc.text)} characters, at most {limits.max_chars}"
            )
        for part, value in (("id", doc.id), ("title", doc.title), ("text", doc.text)):
            _check_encodable(where, part, value)
            _check_no_nul(where, part, value)
        _check_encodable(where, "metadata", json.dumps(dict(doc.metadata), ensure_ascii=False))
        _check_no_nul_in(where, "metadata", doc.metadata)


def _check_encodable(where: str, part: str, value: str) -> None:
    """JSON lets a lone surrogate (half a UTF-16 pair) through; UTF-8 files cannot hold one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{where}: {part} holds {value[exc.start]!r} at {exc.start}, not a character"
        ) from None


def _check_no_nul(where: str, part: str, value: str) -> None:
    """NUL is refused by every store alike: PostgreSQL's text and jsonb cannot hold it, so the
    FAISS store refuses it too (one semantics), before any encoder time is spent."""
    at = value.find("\x00")
    if at >= 0:
        raise InvalidInputError(f"{where}: {part} holds a NUL character ('\\x00') at {at}")


def _check_no_nul_in(where: str, part: str, value: Any) -> None:
    """Every key and string inside a metadata value (json.dumps writes NUL as an escape)."""
    if isinstance(value, str):
        _check_no_nul(where, part, value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_no_nul(where, f"{part} key", str(key))
            _check_no_nul_in(where, f"{part}[{key!r}]", item)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_no_nul_in(where, f"{part}[{i}]", item)


def prepare(documents: Sequence[Document], encoder: TextEncoder, *, words: int) -> Prepared:
    """Chunk each document into passages of about `words` words and embed them all."""
    chunked = [(doc, chunk_document(doc.id, doc.title, doc.text, words=words)) for doc in documents]
    passages = [p for _, doc_passages in chunked for p in doc_passages]
    vectors = np.ascontiguousarray(encoder.encode_passages(passages), dtype=np.float32)
    if vectors.shape != (len(passages), encoder.dim):  # [n, dim]
        raise InvalidInputError(
            f"encoder returned shape {list(vectors.shape)} for {len(passages)} passages"
        )
    if not np.isfinite(vectors).all():
        row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise InvalidInputError(f"vector of passage {passages[row].id!r} is not finite")
    return Prepared(encoder.fingerprint, chunked, vectors)
