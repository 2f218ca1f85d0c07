"""Split a document into passages of about 100 words, the RAG/DPR retrieval unit.

DPR cuts Wikipedia into disjoint 100-word blocks regardless of sentences. Here a chunk is filled
with whole sentences while they fit, which costs nothing and keeps most passages readable; a
sentence longer than the budget is cut at word boundaries. A paragraph break closes a chunk
that is already at least half full. A trailing piece shorter than a quarter of the budget is
merged into the previous chunk, so no passage is a stray sentence.

With `overlap` > 0 each chunk starts with the last `overlap` words of the previous one, and the
budget for new words shrinks by as much, so every passage holds at most `words` words (the merged
last one at most `words` + `words // 4`). Whitespace inside a passage is normalized to single
spaces, as in DPR's passages.
"""

from __future__ import annotations

import re

from app.contracts import Passage
from app.errors import InvalidInputError

# a word that ends a sentence: . ! or ? at its end, perhaps followed by closing quotes or brackets
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class ChunkingError(InvalidInputError):
    pass


def _sentences(paragraph: str) -> list[list[str]]:
    """Words of each sentence of one paragraph; every word is kept, in order."""
    sentences: list[list[str]] = [[]]
    for word in paragraph.split():
        sentences[-1].append(word)
        if _SENTENCE_END.search(word):
            sentences.append([])
    return [s for s in sentences if s]


def _pack(text: str, budget: int) -> list[list[str]]:
    """Greedy packing of whole sentences into pieces of at most `budget` words."""
    pieces: list[list[str]] = []
    current: list[str] = []

    def close() -> None:
        nonlocal current
        if current:
            pieces.append(current)
            current = []

    for paragraph in _PARAGRAPH_BREAK.split(text):
        for sentence in _sentences(paragraph):
            if len(current) + len(sentence) > budget:
                close()
            while len(sentence) > budget:  # a sentence longer than a whole piece
                pieces.append(sentence[:budget])
                sentence = sentence[budget:]
            current.extend(sentence)
        if 2 * len(current) >= budget:
            close()
    close()
    return pieces


def chunk_document(
    doc_id: str, title: str, text: str, words: int = 100, overlap: int = 0
) -> list[Passage]:
    """Passages `f"{doc_id}#{i}"` (i = 0, 1, ...) covering `text` in order; [] for empty text."""
    if words < 1:
        raise ChunkingError(f"words per passage must be at least 1, got {words}")
    if not 0 <= overlap < max(1, words // 2):
        limit = max(1, words // 2)
        raise ChunkingError(f"overlap must be in [0, {limit}) for {words} words, got {overlap}")
    pieces = _pack(text, words - overlap)
    min_tail = max(1, words // 4)
    if len(pieces) > 1 and len(pieces[-1]) < min_tail:
        tail = pieces.pop()
        pieces[-1] = pieces[-1] + tail
    passages = []
    for i, piece in enumerate(pieces):
        carried = pieces[i - 1][-overlap:] if i > 0 and overlap > 0 else []
        passages.append(
            Passage(id=f"{doc_id}#{i}", doc_id=doc_id, title=title, text=" ".join(carried + piece))
        )
    return passages
