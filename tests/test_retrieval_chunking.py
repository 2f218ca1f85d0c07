"""chunk_document: properties that hold for any text, checked on seeded random documents."""

from __future__ import annotations

import random

import pytest

from app.errors import InvalidInputError
from app.retrieval.chunking import chunk_document


def random_document(rng: random.Random, paragraphs: int = 6) -> str:
    """Paragraphs of sentences of 1..40 words; every sentence ends with '.', '!' or '?'."""
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(1, 12)):
            n = rng.randint(1, 40)
            words = [rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(n)]
            sentences.append(" ".join(words) + rng.choice([".", "!", "?", '."']))
        out.append(" ".join(sentences))
    return "\n\n".join(out)


@pytest.mark.parametrize("seed", range(20))
def test_passages_cover_the_text_in_order_within_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    text = random_document(rng)
    words = rng.choice([20, 50, 100])
    passages = chunk_document("doc", "Title", text, words=words)
    assert [w for p in passages for w in p.text.split()] == text.split()
    assert [p.id for p in passages] == [f"doc#{i}" for i in range(len(passages))]
    assert all(p.doc_id == "doc" and p.title == "Title" for p in passages)
    sizes = [len(p.text.split()) for p in passages]
    assert all(n <= words for n in sizes[:-1])
    assert sizes[-1] <= words + words // 4  # a short tail merged into the last passage
    if len(passages) > 1:
        assert sizes[-1] >= words // 4  # ... so no stray scrap at the end


@pytest.mark.parametrize("seed", range(10))
def test_passages_end_at_sentence_ends_when_sentences_fit(seed: int) -> None:
    rng = random.Random(seed)
    text = random_document(rng)  # sentences of at most 40 words < the 100-word budget
    for passage in chunk_document("doc", "T", text, words=100):
        assert passage.text.rstrip('"').endswith((".", "!", "?"))


def test_a_sentence_longer_than_the_budget_is_cut_at_words() -> None:
    text = " ".join(f"w{i}" for i in range(250)) + "."
    sizes = [len(p.text.split()) for p in chunk_document("d", "", text, words=100)]
    assert sizes == [100, 100, 50]


def test_a_short_tail_merges_into_the_previous_passage() -> None:
    text = " ".join(["word"] * 99) + ". Tail end."
    passages = chunk_document("d", "", text, words=100)
    assert len(passages) == 1 and passages[0].text.endswith("Tail end.")


def test_paragraph_break_closes_a_half_full_passage_but_not_a_nearly_empty_one() -> None:
    first = " ".join(["a"] * 59) + "."
    second = " ".join(["b"] * 59) + "."
    split = chunk_document("d", "", f"{first}\n\n{second}", words=100)
    assert [p.text for p in split] == [first, second]
    short = " ".join(["a"] * 9) + "."
    joined = chunk_document("d", "", f"{short}\n\n{second}", words=100)
    assert [p.text for p in joined] == [f"{short} {second}"]


@pytest.mark.parametrize("seed", range(10))
def test_overlap_repeats_the_previous_passages_last_words(seed: int) -> None:
    rng = random.Random(seed)
    text = random_document(rng)
    overlap = 10
    passages = chunk_document("d", "T", text, words=60, overlap=overlap)
    tokens = [p.text.split() for p in passages]
    assert all(len(t) <= 60 for t in tokens[:-1])
    new_words = [tokens[0]] + [t[overlap:] for t in tokens[1:]]
    assert [w for t in new_words for w in t] == text.split()
    for previous, current in zip(new_words, tokens[1:], strict=False):
        assert current[:overlap] == previous[-overlap:]


def test_empty_text_gives_no_passages() -> None:
    assert chunk_document("d", "T", "  \n\n ") == []


@pytest.mark.parametrize(("words", "overlap"), [(0, 0), (100, 50), (100, -1)])
def test_bad_sizes_are_refused_naming_the_value(words: int, overlap: int) -> None:
    with pytest.raises(InvalidInputError, match=str(words) if words < 1 else str(overlap)):
        chunk_document("d", "T", "some text.", words=words, overlap=overlap)
