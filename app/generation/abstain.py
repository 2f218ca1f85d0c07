"""Grounded abstention: say the documents do not hold the answer instead of inventing one.

Three signals, chosen by measurement on the demo corpus (bench/answer_quality.py and
bench/abstain_signals.py, figures in bench/RESULTS.md, "Answer quality"):

- retrieval support: the best passage's retrieval score (cosine, all-MiniLM-L6-v2). Below
  `min_score` no passage is about the question, and generation is skipped altogether. Under
  hybrid retrieval the hits' scores are RRF's, so the gate reads the dense half's best cosine,
  which every hybrid hit carries (Hit.dense_best): hybrid abstains exactly when dense would.
  Sparse (BM25) retrieval computes no cosine, and its scores have no fixed scale: it is not
  gated, only the two verdicts below count for it;
- the answer's support in the passages, after generation: the share of its content words
  (`content_words`: stemmed, function words out) that occur in the retrieved passages. Below
  `min_support` the answer brings words from nowhere in the documents (an invented name, a
  number the passages do not hold). It catches what passes the gate with a made-up answer,
  and on the demo sets it never took a right answer (RESULTS, "Abstention: signals tried");
- the generator's own verdict: an answer that says the documents do not contain it (what the
  `grounded` adapter is trained to say) is an abstention too.

The generator's likelihood with and without the passages (their pointwise mutual information)
was measured as well and not kept: it needs a second forward pass per answer and separated no
better than support (RESULTS). So was the share of the question's words in the best passage:
on the train questions no threshold added to these without withholding right answers, and a
lexical gate would refuse questions asked in other words than the documents' (RESULTS, "The
citation check").
"""

from __future__ import annotations

import re
import string
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import Stemmer  # PyStemmer: Snowball, as bm25s and Lucene's English analyzers stem

from app.contracts import Hit, Passage, SearchMode

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
    # below this share of the answer's content words found in the passages it abstains; 0: off
    min_support: float = 0.5

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"abstain min_score must be within [-1, 1], got {self.min_score}")
        if not 0.0 <= self.min_support <= 1.0:
            raise ValueError(f"abstain min_support must be within [0, 1], got {self.min_support}")


def gate_cosines(search: SearchMode, hits: Sequence[Hit]) -> list[float] | None:
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


# SQuAD's answer normalization drops the articles; these are the other words that any answer
# shares with any passage, so they say nothing about support
_FUNCTION_WORDS_LISTED = (
    "a an the of in on at to for by with from and or is are was were be been it its this that "
    "as which who what when where whose there their they he she his her"
)
_FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_LISTED.split())
_CITATION = re.compile(r"\[\d+\]")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_stemmers = threading.local()  # a Stemmer object is not safe to share between threads


def content_words(text: str) -> list[str]:
    """The words that carry content, Snowball-stemmed: citation markers [n], punctuation and
    function words out, lower case ("Juneau [1]." -> ["juneau"])."""
    stemmer = getattr(_stemmers, "english", None)
    if stemmer is None:
        stemmer = _stemmers.english = Stemmer.Stemmer("english")
    said = _CITATION.sub(" ", text).lower().translate(_PUNCTUATION).split()
    return list(stemmer.stemWords([w for w in said if w not in _FUNCTION_WORDS]))


def answer_support(answer: str, passages: Sequence[Passage]) -> float | None:
    """The share of the answer's content words that occur in the passages (titles included);
    None when the answer has no content word to check."""
    said = content_words(answer)
    if not said:
        return None
    found = set(content_words(" ".join(f"{p.title} {p.text}" for p in passages)))
    return sum(w in found for w in said) / len(said)


def ungrounded(config: AbstainConfig, answer: str, passages: Sequence[Passage]) -> bool:
    """The answer's words are too few in the passages for it to come from them."""
    if not config.enabled or config.min_support <= 0:
        return False
    share = answer_support(answer, passages)
    return share is not None and share < config.min_support
