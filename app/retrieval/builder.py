"""Build an index folder from source files: read, chunk, embed, save atomically.

The vectors are computed in blocks of a few hundred passages so that one progress bar can show
passages per second; inside each block the encoder sorts by length and batches as it likes.
Nothing is written at `out` until every passage is embedded, and then in one atomic rename.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from app.errors import InvalidInputError
from app.retrieval.chunking import chunk_document
from app.retrieval.encoders import TextEncoder
from app.retrieval.sources import read_sources
from app.retrieval.store import IndexManifest, PassageIndex
from app.retrieval.types import Passage

logger = logging.getLogger(__name__)

BLOCK = 512  # passages per encode call: large enough for length sorting, small for a live bar


def collect_passages(sources: Sequence[Path], *, words: int = 100) -> list[Passage]:
    """Every passage of every source document, in source order; document ids must be unique."""
    passages: list[Passage] = []
    seen: dict[str, str] = {}  # doc id -> where it was first seen
    for document in read_sources(sources):
        if document.id in seen:
            first = seen[document.id]
            message = f"document id {document.id!r} occurs twice: {first} and {document.source}"
            raise InvalidInputError(message)
        seen[document.id] = document.source
        passages.extend(chunk_document(document.id, document.title, document.text, words=words))
    return passages


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


def build_index(
    sources: Sequence[Path],
    encoder: TextEncoder,
    out: Path,
    *,
    show_progress: bool = True,
    words: int = 100,
) -> IndexManifest:
    """Index every passage of `sources` with `encoder` into the folder `out` (replacing it)."""
    started = time.perf_counter()
    passages = collect_passages(sources, words=words)
    if not passages:
        raise InvalidInputError(f"no text to index in {[str(s) for s in sources]}")
    logger.info("embedding %d passages with %s", len(passages), encoder.fingerprint)
    embed_started = time.perf_counter()
    vectors = embed_passages(passages, encoder, show_progress=show_progress)
    embed_s = time.perf_counter() - embed_started
    index = PassageIndex.build(passages, vectors, encoder.fingerprint)
    index.save(out)
    logger.info(
        "built %s: %d passages in %.1f s (%.0f passages/s embedding)",
        out,
        len(passages),
        time.perf_counter() - started,
        len(passages) / max(embed_s, 1e-9),
    )
    return index.manifest
