"""The citation check: each "[n]" in an answer names a passage that holds what it cites.

A small generator often copies a span from one passage and closes it with a neighbour's number
(bench/RESULTS.md, "Where the shipped cited misses": 4 of the 5 right answers citing the wrong
passage named the next one). So after the generator writes a mark, the claim it closes (the
answer's text since the previous mark or sentence end) is matched against every passage the
prompt numbered, by content words (`abstain.content_words`, the support check's measure:
stemmed, function words out). The mark stands when its passage holds at least half of the
claim's words, or as many as any passage holds; otherwise it names the passage holding the
most, ties to the higher retrieval score. This is the keyword tier of CiteFix (Maheshwari et
al., ACL 2025 industry track), which adds semantic matching on top; the keyword tier is what a
short extractive answer needs, and it costs no model call.

A mark depends only on the text before it, so the check runs on a streamed answer as it grows:
text is handed on up to a mark still being written ("[1" waits for its "]"), and the streamed
pieces join into the checked answer. Two marks side by side that come to name one passage
become one. Figures: bench/RESULTS.md, "The citation check". Its cost on the 2-core CPU:
0.18 ms to stem five 100-word passages, 0.2 ms to check a 200-word answer with 20 marks, so a
streamed answer is checked at every step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from app.generation.abstain import content_words

_MARK = re.compile(r"\[(\d+)\]")
_OPEN_MARK = re.compile(r"\[\d*$")  # a mark still being written, at the end of the text
_SENTENCE_END = re.compile(r"[.!?]\s")


@dataclass(frozen=True, slots=True)
class Checked:
    text: str  # the answer with its marks checked (up to a mark still being written)
    moved: int  # marks that now name another passage


class CitationCheck:
    """Checks the marks of one answer against the passages its prompt numbered [1], [2], ..."""

    def __init__(
        self, passages: Sequence[tuple[str, str]], scores: Sequence[float], stands: float = 0.5
    ) -> None:
        """passages: (title, text) in the prompt's numbering; scores: their retrieval scores;
        stands: the share of its claim's words a mark's passage must hold for the mark to stand
        whatever other passages hold (1.0: a mark moves whenever another passage holds more;
        bench/citation_rules.py compares the two)."""
        self._words = [frozenset(content_words(f"{title} {text}")) for title, text in passages]
        self._scores = list(scores)
        self._stands = stands

    def __call__(self, answer: str, final: bool = True) -> Checked:
        """The answer with each mark checked; before the answer is final, the text stops short
        of a trailing mark still being written, so that what a stream has sent is never taken
        back."""
        if not final:
            # a mark still being written waits for its end, and trailing space for what
            # follows it (a second mark that names the same passage goes with its space)
            if open_mark := _OPEN_MARK.search(answer):
                answer = answer[: open_mark.start()]
            answer = answer.rstrip()
        out: list[str] = []
        moved, last, claim = 0, 0, ""
        named: set[int] = set()  # the passages the marks after the claim name
        for m in _MARK.finditer(answer):
            between = answer[last : m.start()]
            last = m.end()
            if between.strip():  # marks side by side ("[1][2]") share the claim before them
                claim, named = _SENTENCE_END.split(between)[-1], set()
            written = int(m.group(1))
            n = self._cite(claim, written)
            if n in named:  # a second mark that now names the same passage goes
                moved += 1
                continue
            named.add(n)
            moved += n != written
            out.append(f"{between}[{n}]")
        out.append(answer[last:])
        return Checked("".join(out), moved)

    def _cite(self, claim: str, n: int) -> int:
        """The passage number that should close claim, written as n."""
        said = frozenset(content_words(claim))
        if not said or not self._words:
            return n
        held = [len(said & words) for words in self._words]
        cited = held[n - 1] if 1 <= n <= len(held) else 0
        if cited >= self._stands * len(said) or cited >= max(held):
            return n
        best = max(range(len(held)), key=lambda i: (held[i], self._scores[i], -i))
        return best + 1
