"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009): the one way every store
fuses its dense and sparse lists into a hybrid one.

A passage's fused score is the sum, over the lists that hold it, of 1 / (k + rank), rank
counted from 1; k = 60 as in the paper. Only ranks count, so a cosine and a BM25 score, on
scales that do not compare, need no calibration. A hybrid Hit's `score` is this RRF score (at
most 2 / (k + 1), about 0.033 for two lists), not a similarity.

Ties (the same ranks in swapped lists, say) keep a stable order: the passage met first going
through the lists in the order given (dense before sparse), each from its top, comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from app.contracts import Hit

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
