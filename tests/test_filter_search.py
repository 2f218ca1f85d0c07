"""Filtered search on the FAISS store: only passages of matching documents come back, k of
them when k exist (a selective filter on an HNSW graph included), equal to exact search among
the matching passages, and still so after a replace and a delete."""

from __future__ import annotations

import numpy as np
import pytest

from app.contracts import Passage
from app.retrieval import wal
from app.retrieval.ann import AnnSpec
from app.retrieval.docstore import StoredDocument
from app.retrieval.filters import parse
from app.retrieval.store import PassageIndex

DIM, DOCS, PER_DOC = 16, 400, 2


def _corpus(seed: int = 0) -> tuple[list[Passage], np.ndarray, dict[str, dict[str, object]]]:
    rng = np.random.default_rng(seed)
    passages = [
        Passage(f"d{d}#{j}", f"d{d}", f"T{d}", f"text {d} {j}")
        for d in range(DOCS)
        for j in range(PER_DOC)
    ]
    vectors = rng.standard_normal((len(passages), DIM)).astype(np.float32)  # [800, 16]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # 1 in 100 documents is "rare": a filter whose passages an HNSW walk mostly misses
    metadata = {f"d{d}": {"rare": d % 100 == 7, "year": 1900 + d % 50} for d in range(DOCS)}
    return passages, vectors, metadata


def _exact(vectors: np.ndarray, ids: list[int], query: np.ndarray, k: int) -> list[int]:
    sims = vectors[ids] @ query  # [m]
    return [ids[i] for i in np.argsort(-sims, kind="stable")[:k]]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_filter_returns_k_matching_passages_as_exact_search(kind: str) -> None:
    passages, vectors, metadata = _corpus()
    spec = AnnSpec(kind=kind, hnsw_m=8, ef_search=16)  # type: ignore[arg-type]
    index = PassageIndex.build(passages, vectors, "fp", spec=spec, metadata=metadata)
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    for raw, k in [({"rare": True}, 8), ({"year": {"$gte": 1940}, "rare": False}, 10)]:
        f = parse(raw)
        assert f is not None
        allowed = [i for i, p in enumerate(passages) if f.matches(metadata[p.doc_id])]
        assert len(allowed) >= k
        for q, hits in zip(queries, index.search(queries, k, f), strict=True):
            assert len(hits) == k
            assert all(f.matches(metadata[h.passage.doc_id]) for h in hits)
            if kind == "flat" or raw == {"rare": True}:  # exact (flat, or the exact fallback)
                expected = [passages[i].id for i in _exact(vectors, allowed, q, k)]
                assert [h.passage.id for h in hits] == expected


def test_filter_after_replace_and_delete() -> None:
    passages, vectors, metadata = _corpus()
    index = PassageIndex.build(
        passages, vectors, "fp", spec=AnnSpec(kind="flat"), metadata=metadata
    )
    rare = parse({"rare": True})
    before = {h.passage.doc_id for h in index.search(vectors[:1], 100, rare)[0]}
    assert before == {f"d{d}" for d in range(DOCS) if d % 100 == 7}
    # d7 is replaced with rare=false, d107 deleted: neither may come back under the filter
    pid = index.next_id
    replaced = StoredDocument(
        "d7", "T7", (Passage("d7#0", "d7", "T7", "new"),), (pid,), {"rare": False}
    )
    index.apply(wal.Upsert(index.last_seq + 1, (replaced,), vectors[:1]))
    index.apply(wal.Delete(index.last_seq + 1, ("d107",)))
    after = index.search(vectors[:1], 100, rare)[0]
    assert {h.passage.doc_id for h in after} == before - {"d7", "d107"}
    assert len(after) == PER_DOC * len(before - {"d7", "d107"})
    not_rare = parse({"rare": False})
    assert "d7" in {h.passage.doc_id for h in index.search(vectors[:1], 3, not_rare)[0]}
