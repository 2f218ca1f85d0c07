"""Build an index folder from source files: read, chunk, embed, save atomically.

The vectors are computed in blocks of a few hundred passages so that one progress bar can show
passages per second; inside each block the encoder sorts by length and batches as it likes.
Nothing is written at `out` until every passage is embedded, and then in one atomic rename,
under the index folder's writer lock (app/retrieval/live.py), so a build never replaces an index
in the middle of another process's update; a server that serves `out` reloads it before its next
change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from app.contracts import Passage
from app.errors import InvalidInputError
from app.retrieval.ann import AnnSpec
from app.retrieval.atomic import remove_stale_temp
from app.retrieval.chunking import chunk_document
from app.retrieval.encoders import TextEncoder
from app.retrieval.live import folder_lock
from app.retrieval.manifest import IndexManifest
from app.retrieval.sources import Document, read_sources
from app.retrieval.store import PassageIndex

logger = logging.getLogger(__name__)

BLOCK = 512  # passages per encode call: large enough for length sorting, small for a live bar


def collect_documents(sources: Sequence[Path]) -> list[Document]:
    """Every source document, in source order; document ids must be unique."""
    documents: list[Document] = []
    seen: dict[str, str] = {}  # doc id -> where it was first seen
    for document in read_sources(sources):
        if document.id in seen:
            first = seen[document.id]
            message = f"document id {document.id!r} occurs twice: {first} and {document.source}"
            raise InvalidInputError(message)
        seen[document.id] = document.source
        documents.append(document)
    return documents


def collect_passages(sources: Sequence[Path], *, words: int = 100) -> list[Passage]:
    """Every passage of every source document, in source order; document ids must be unique."""
    return [
        passage
        for d in collect_documents(sources)
        for passage in chunk_document(d.id, d.title, d.text, words=words)
    ]


def embed_passages(
    passages: Sequence[Passage], encoder: TextEncoder, *, show_progress: bool = True
) -> np.ndarray:
    vectors = np.zeros((len(passages), encoder.dim), dtype=np.float32)  # [n, dim]
    with tqdm(
        total=len(passages), unit="passage", desc="embedding", disable=not show_progress
    ) as bar:
        for start in range(0, len(passages), BLOCK):
            block = passages[start : start + BLOCK]
            vectors[start : start + len(block)] = encoder.encode_passages(block)
            bar.update(len(block))
    return vectors


def build_passage_index(
    sources: Sequence[Path],
    encoder: TextEncoder,
    *,
    show_progress: bool = True,
    words: int = 100,
    spec: AnnSpec | None = None,
) -> PassageIndex:
    """Every passage of `sources`, embedded with `encoder`, in an index held in memory."""
    started = time.perf_counter()
    documents = collect_documents(sources)
    passages = [
        passage for d in documents for passage in chunk_document(d.id, d.title, d.text, words=words)
    ]
    if not passages:
        raise InvalidInputError(f"no text to index in {[str(s) for s in sources]}")
    logger.info("embedding %d passages with %s", len(passages), encoder.fingerprint)
    embed_started = time.perf_counter()
    vectors = embed_passages(passages, encoder, show_progress=show_progress)
    embed_s = time.perf_counter() - embed_started
    metadata = {d.id: d.metadata for d in documents if d.metadata}
    index = PassageIndex.build(
        passages, vectors, encoder.fingerprint, spec=spec, metadata=metadata, chunk_words=words
    )
    logger.info(
        "indexed %d passages in %.1f s (%.0f passages/s embedding)",
        len(passages),
        time.perf_counter() - started,
        len(passages) / max(embed_s, 1e-9),
    )
    return index


def build_index(
    sources: Sequence[Path],
    encoder: TextEncoder,
    out: Path,
    *,
    show_progress: bool = True,
    words: int = 100,
    spec: AnnSpec | None = None,
) -> IndexManifest:
    """Index every passage of `sources` with `encoder` into the folder `out` (replacing it)."""
    index = build_passage_index(
        sources, encoder, show_progress=show_progress, words=words, spec=spec
    )
    with folder_lock(out):
        remove_stale_temp(out)
        index.save(out)
    logger.info("built %s", out)
    return index.manifest
