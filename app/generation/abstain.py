"""Grounded abstention: say the documents do not hold the answer instead of inventing one.

Two signals, chosen by measurement on the demo corpus (bench/answer_quality.py, figures in
bench/RESULTS.md, "Answer quality"):

- retrieval support: the best passage's retrieval score (cosine, all-MiniLM-L6-v2). Below
  `min_score` no passage is about the question, and generation is skipped altogether. Under
  hybrid retrieval the hits' scores are RRF's, so the gate reads the dense half's best cosine,
  which every hybrid hit carries (Hit.dense_best): hybrid abstains exactly when dense would.
  Sparse (BM25) retrieval computes no cosine, and its scores have no fixed scale: it is not
  gated, only the generator's verdict below counts for it;
- the generator's own verdict: an answer that says the documents do not contain it (what the
  `grounded` adapter is trained to say) is an abstention too.

The answer's token overlap with the passages was measured as well and not kept (see RESULTS):
the 135M generator copies passage words into wrong answers as readily as into right ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from app.contracts import Hit, SearchMode

ABSTAIN_TEXT = "The documents do not contain the answer."
# what the generator may say instead, in its own words (lower case, punctuation stripped)
_REFUSALS = re.compile(
    r"\b(?:documents?|passages?|context|texts?) (?:do|does) not (?:contain|mention|say|provide)"
    r"|\bnot (?:contained|mentioned) in the (?:documents?|passages?)"
)


@dataclass(frozen=True, slots=True)
class AbstainConfig:
    enabled: bool = True
    # below this best retrieval score (cosine for the default encoder) the service abstains
    min_score: float = 0.45

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"abstain min_score must be within [-1, 1], got {self.min_score}")


def support(search: SearchMode, hits: Sequence[Hit]) -> list[float] | None:
    """The cosines the gate compares with min_score: dense, the hits' scores; hybrid, the
    dense half's best (none when it found nothing); sparse, None (not gated)."""
    if search == "dense":
        return [h.score for h in hits]
    if search == "hybrid":
        return [h.dense_best for h in hits[:1] if h.dense_best is not None]
    return None


def unsupported(config: AbstainConfig, scores: Sequence[float]) -> bool:
    """No retrieved passage scores high enough to hold the answer (before generation)."""
    return config.enabled and (not scores or max(scores) < config.min_score)


def refuses(config: AbstainConfig, answer: str) -> bool:
    """The generator itself says the documents do not contain the answer."""
    if not config.enabled:
        return False
    text = " ".join(re.sub(r"[^\w\s]", " ", answer.lower()).split())
    return _REFUSALS.search(text) is not None
