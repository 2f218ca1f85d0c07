"""`lorag index copy`: a FAISS index folder's documents into any store, with their vectors.

The vectors come out of the FAISS index (`PassageIndex.vectors`: flat and HNSW keep them
exactly), so nothing is embedded again and the copy searches as the folder does: the same
passages (ids, titles, texts, the document's metadata) under the same encoder fingerprint,
which the target store checks as for any upsert. Documents go over in batches of whole
documents, each batch one upsert (all or none); a copy that stops part way is resumed by
running it again, since an upsert of a document already there replaces it. Into an empty
collection that `LoadsInBulk` (PostgreSQL) the batches go in one load instead: one
transaction, the HNSW index built after the COPY rather than row by row, so a copy that stops
leaves the collection empty, and a reader sees it empty or whole.
"""

from __future__ import annotations

import logging

from app.errors import InvalidInputError
from app.retrieval.docstore import StoredDocument
from app.retrieval.interface import Collection, LoadsInBulk, PassageStore
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, Prepared

log = logging.getLogger(__name__)

BATCH = 256  # documents per upsert (the demo corpus: ~20 upserts)


def prepared_from(source: PassageIndex, documents: list[StoredDocument]) -> Prepared:
    """These documents of `source`, as an upsert of their stored passages and vectors."""
    pids = [pid for doc in documents for pid in doc.pids]
    return Prepared(
        source.manifest.encoder,
        [
            (
                Document(doc.id, doc.title, " ".join(p.text for p in doc.passages), doc.metadata),
                list(doc.passages),
            )
            for doc in documents
        ],
        source.vectors(pids),  # [len(pids), dim], in document then passage order
    )


def copy_index(
    source: PassageIndex, target: Collection, *, batch: int | None = None
) -> tuple[int, int]:
    """Every document of `source` into `target`, `batch` documents an upsert (BATCH if None),
    or one bulk load into an empty target that offers it; (documents, passages) copied."""
    batch = batch or BATCH
    documents = sorted(source.documents(), key=lambda d: d.id)
    chunks = [documents[start : start + batch] for start in range(0, len(documents), batch)]
    if isinstance(target, LoadsInBulk) and documents and target.count()[1] == 0:
        loaded = target.load(prepared_from(source, chunk) for chunk in chunks)  # one by one
        log.info("loaded %d documents in one transaction", len(documents))
        return len(documents), loaded
    passages = copied = 0
    for chunk in chunks:
        passages += sum(u.passages for u in target.upsert(prepared_from(source, chunk)))
        copied += len(chunk)
        log.info("copied %d of %d documents", copied, len(documents))
    return len(documents), passages


def fill(
    store: PassageStore, name: str, source: PassageIndex, *, whole: bool = False
) -> tuple[int, int]:
    """A new index `name` in `store` holding `source` (`lorag index build` into a store that
    is not a folder, the demo index in the database); one that already holds documents is
    refused by name, since a build replaces and an upsert would only add. whole: every document
    in one upsert, so readers see the index empty, then whole (for a bounded corpus: it is one
    transaction, its COPY one statement under the database's statement timeout); else in
    batches of BATCH documents."""
    target = store.create(name, dim=source.dim, chunk_words=source.manifest.chunk_words)
    passages, documents = target.count()
    if documents:
        raise InvalidInputError(
            f"{store.kind} index {name!r} already holds {documents} documents ({passages} "
            "passages): add or replace documents with `lorag index add`, or build another name"
        )
    return copy_index(source, target, batch=max(1, source.document_count) if whole else None)
