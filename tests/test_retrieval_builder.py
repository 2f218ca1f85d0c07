"""build_index and Retriever end to end with a tiny real sentence-transformers encoder."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

import app.retrieval.builder as builder
from app.contracts import Passage
from app.errors import IndexInvalid, InvalidInputError
from app.retrieval.builder import build_index, collect_passages
from app.retrieval.encoders import TextEncoder, load_encoder
from app.retrieval.memory_store import MemoryStore
from app.retrieval.retriever import Retriever
from app.retrieval.store import PassageIndex
from tests.tiny_encoders import WORDS, tiny_sentence_transformer


def sentences(seed: int, n: int) -> str:
    """n random sentences over the tiny vocabulary, so no two passages are equal."""
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + "." for _ in range(n))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    folder = tiny_sentence_transformer(tmp_path_factory.mktemp("enc"))
    return load_encoder(str(folder), "sentence-transformers")


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "glacier.md").write_text("# Glacier\n\n" + sentences(0, 60))
    (folder / "sub" / "piano.txt").write_text(sentences(1, 30))
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"id": f"doc{i}", "title": f"T{i}", "text": sentences(10 + i, 1 + 8 * i)})
            + "\n"
            for i in range(4)
        )
    )
    return [folder, jsonl]


def test_built_index_holds_every_passage_in_order(
    encoder: TextEncoder, sources: list[Path], tmp_path: Path
) -> None:
    expected = collect_passages(sources)
    manifest = build_index(sources, encoder, tmp_path / "idx", show_progress=False)
    assert manifest.passage_count == len(expected) > 6  # long docs were chunked
    assert manifest.encoder == encoder.fingerprint and manifest.dim == encoder.dim
    index = PassageIndex.load(tmp_path / "idx", expect_fingerprint=encoder.fingerprint)
    assert list(index.passages) == expected
    # row i holds passage i's vector: each passage, embedded again, finds itself first
    top = index.search(encoder.encode_passages(expected), 1)
    assert [hits[0].passage.id for hits in top] == [p.id for p in expected]


def test_retriever_equals_exact_search_over_encoder_outputs(
    encoder: TextEncoder, sources: list[Path], tmp_path: Path
) -> None:
    build_index(sources, encoder, tmp_path / "idx", show_progress=False)
    index = PassageIndex.load(tmp_path / "idx")
    retriever = Retriever(encoder, MemoryStore(index))
    questions = ["how does a glacier flow", "what made sound", "eel"]
    hits = retriever.retrieve(questions, 4)
    scores = encoder.encode_questions(questions) @ encoder.encode_passages(index.passages).T
    for row, q_scores in zip(hits, scores, strict=True):
        order = np.argsort(-q_scores, kind="stable")[:4]
        assert [h.passage.id for h in row] == [index.passages[i].id for i in order]
        np.testing.assert_allclose([h.score for h in row], q_scores[order], rtol=1e-4, atol=1e-5)
    assert retriever.retrieve([], 3) == []
    with pytest.raises(InvalidInputError, match="got 0"):
        retriever.retrieve(questions, 0)
    with pytest.raises(InvalidInputError, match="not one string"):
        retriever.retrieve("a question", 1)


def test_retriever_refuses_an_index_of_another_encoder(encoder: TextEncoder) -> None:
    index = PassageIndex.build(
        [Passage("d#0", "d", "", "x")], np.ones((1, encoder.dim), dtype=np.float32), "other"
    )
    with pytest.raises(IndexInvalid, match="'other'"):
        Retriever(encoder, MemoryStore(index))


class FailingEncoder:
    """The real encoder, interrupted on its n-th call (a killed or crashed build)."""

    def __init__(self, inner: TextEncoder, fail_on_call: int) -> None:
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, 0
        self.fingerprint, self.dim = inner.fingerprint, inner.dim

    def encode_questions(self, questions: list[str]) -> np.ndarray:
        return self.inner.encode_questions(questions)

    def encode_passages(self, passages: list[Passage], **kwargs: object) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        return self.inner.encode_passages(passages)


def test_interrupted_build_keeps_the_old_index(
    encoder: TextEncoder, sources: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "index" / "demo"
    build_index(sources[1:], encoder, out, show_progress=False)
    before = PassageIndex.load(out)
    monkeypatch.setattr(builder, "BLOCK", 2)
    failing = FailingEncoder(encoder, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        build_index(sources, failing, out, show_progress=False)  # type: ignore[arg-type]
    assert failing.calls == 3
    assert sorted(p.name for p in out.parent.iterdir()) == [".demo.lock", "demo"]  # no temp
    assert list(PassageIndex.load(out).passages) == list(before.passages)


def test_duplicate_document_ids_and_empty_sources_are_refused(
    encoder: TextEncoder, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"id": "same", "text": "one"}) + "\n")
    b.write_text(json.dumps({"id": "same", "text": "two"}) + "\n")
    with pytest.raises(InvalidInputError, match=re.escape(f"'same' occurs twice: {a}:1 and {b}:1")):
        build_index([a, b], encoder, tmp_path / "idx", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no text to index"):
        build_index([tmp_path / "empty"], encoder, tmp_path / "idx", show_progress=False)
    assert not (tmp_path / "idx").exists()


def test_progress_bar_reports_passages_per_second(
    encoder: TextEncoder, sources: list[Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    build_index(sources, encoder, tmp_path / "idx", show_progress=True)
    err = capfd.readouterr().err
    assert "embedding" in err and "passage/s" in err
