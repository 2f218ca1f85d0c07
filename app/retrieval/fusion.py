"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009): the one way every store
fuses its dense and sparse lists into a hybrid one.

A passage's fused score is the sum, over the lists that hold it, of 1 / (k + rank), rank
counted from 1; k = 60 as in the paper. Only ranks count, so a cosine and a BM25 score, on
scales that do not compare, need no calibration. A hybrid Hit's `score` is this RRF score (at
most 2 / (k + 1), about 0.033 for two lists), not a similarity.

Ties (the same ranks in swapped lists, say) keep a stable order: the passage met first going
through the lists in the order given (dense before sparse), each from its top, comes first.

`search_by_mode` is how every store (FAISS, PostgreSQL) answers a search mode, given its own
dense and sparse searches: the same checks, the same depth, the same fusion. A hybrid Hit
carries `dense_best`, the best dense score of its question (the dense list's top, whether or not
that passage survived the fusion), which is what the abstention gate compares with its cosine
threshold (app/generation/abstain.py) when the hit's own score is RRF's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from app.contracts import SEARCH_MODES, Hit, SearchMode
from app.errors import InvalidInputError

RRF_K = 60  # Cormack et al.'s constant


@dataclass(frozen=True)
class Fusion:
    """How a hybrid search fuses: RRF's k, and how deep each list is read (at least the k
    passages asked for). Depth 50: on the demo's 229 answerable questions, hybrid recall@5 was
    0.834 fusing the top 20 of each list, 0.852 the top 50 or 100 (bench/RESULTS.md, "Hybrid
    retrieval"); RRF's k (10 to 120) moved it by at most 0.01."""

    rrf_k: int = RRF_K
    depth: int = 50

    def __post_init__(self) -> None:
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {self.rrf_k}")
        if self.depth < 1:
            raise ValueError(f"fusion depth must be >= 1, got {self.depth}")

    def depth_for(self, k: int) -> int:
        return max(k, self.depth)


DEFAULT_FUSION = Fusion()


def rrf(lists: Sequence[Sequence[Hit]], k: int, *, rrf_k: int = RRF_K) -> list[Hit]:
    """The k best passages of `lists` (each best first) by reciprocal rank fusion; each Hit is
    the first one met for its passage, with the RRF score as its score."""
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for hits in lists:
        for rank, hit in enumerate(hits, start=1):
            key = hit.passage.id
            scores[key] = scores.get(key, 0.0) + 1.0 / (rrf_k + rank)
            first.setdefault(key, hit)
    # sorted() is stable: equal scores keep the first-met order of `first`
    ranked = sorted(first, key=lambda key: -scores[key])[:k]
    return [replace(first[key], score=scores[key]) for key in ranked]


def hybrid(
    dense: Sequence[Sequence[Hit]],
    sparse: Sequence[Sequence[Hit]],
    k: int,
    fusion: Fusion = DEFAULT_FUSION,
) -> list[list[Hit]]:
    """Per question, the k best of its dense and sparse lists by RRF; every fused Hit carries
    the dense list's best score as `dense_best` (None when the dense list is empty)."""
    fused = []
    for d, s in zip(dense, sparse, strict=True):
        best = d[0].score if d else None
        fused.append([replace(h, dense_best=best) for h in rrf([d, s], k, rrf_k=fusion.rrf_k)])
    return fused


DenseSearch = Callable[[np.ndarray, int], list[list[Hit]]]  # (queries [n, dim], k)
SparseSearch = Callable[[Sequence[str], int], list[list[Hit]]]  # (questions, k)


def search_by_mode(
    queries: np.ndarray | None,  # [n, dim] float32; dense and hybrid
    k: int,
    mode: SearchMode,
    texts: Sequence[str] | None,  # the n questions; sparse and hybrid
    *,
    dense: DenseSearch,
    sparse: SparseSearch,
    fusion: Fusion = DEFAULT_FUSION,
) -> list[list[Hit]]:
    """A store's search in `mode`: its dense search, its sparse one, or both `depth_for(k)` deep
    fused by `hybrid`; what a mode needs that is missing is refused by name."""
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    if mode not in SEARCH_MODES:
        raise InvalidInputError(f"unknown search mode {mode!r}: one of {list(SEARCH_MODES)}")
    if mode != "dense" and (texts is None or isinstance(texts, str)):
        raise InvalidInputError(f"a {mode} search needs the questions' texts")
    if mode == "sparse":
        return sparse(texts or (), k)
    if queries is None:
        raise InvalidInputError(f"a {mode} search needs the question vectors")
    if mode == "dense":
        return dense(queries, k)
    texts = texts or ()
    if len(texts) != queries.shape[0]:
        raise InvalidInputError(f"{len(texts)} question texts for {queries.shape[0]} vectors")
    depth = fusion.depth_for(k)
    return hybrid(dense(queries, depth), sparse(texts, depth), k, fusion)
