"""The committed demo corpus and its demo questions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from app.contracts import Passage
from app.retrieval.chunking import chunk_document
from app.retrieval.sources import Document, read_sources

SOURCES = Path(__file__).resolve().parents[1] / "index" / "sources"
DEMO = SOURCES / "demo.jsonl"
QUESTIONS = json.loads((SOURCES / "demo_questions.json").read_text(encoding="utf-8"))
DISTRACTORS = ["Anarchism", "Alabama", "Apollo_11", "Autism"]


WIKITEXT = """{{Infobox|name=x|{{nested|y}}}}
'''Albedo''' ({{IPA|x}}) is the [[diffuse reflection|diffuse reflectivity]] of a [[surface]].\
<ref name="a">{{cite web|url=x}}</ref> It is 5&nbsp;km.<ref name="b"/>
[[File:A.svg|thumb|caption with [[link]] inside]]
{| class="wikitable"
| cell || 0.04
|}
== History ==
Introduced by [http://example.com Lambert] in {{convert|1760|km}}.<!-- comment -->
* item one with ''emphasis'' and more words
== See also ==
* [[Other]] article text here to see
[[Category:Optics]]
"""


def load_script() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_corpus.py"
    spec = importlib.util.spec_from_file_location("make_demo_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_markup_stripping_keeps_text_and_drops_the_rest() -> None:
    assert load_script().strip_markup(WIKITEXT) == (
        "Albedo is the diffuse reflectivity of a surface. It is 5 km.\n\n"
        "Introduced by Lambert in 1760 km. item one with emphasis and more words"
    )


@pytest.fixture(scope="module")
def documents() -> dict[str, Document]:
    return {d.id: d for d in read_sources([DEMO])}


def passages_of(doc: Document, words: int = QUESTIONS["chunk_words"]) -> list[Passage]:
    return chunk_document(doc.id, doc.title, doc.text, words=words)


def test_demo_corpus_is_compact_attributed_and_well_formed(documents: dict[str, Document]) -> None:
    assert DEMO.stat().st_size < 3_000_000
    assert len(documents) == len(DEMO.read_text(encoding="utf-8").splitlines()) >= 90
    urls = [d.metadata["url"] for d in documents.values()]
    assert all(url.startswith("https://en.wikipedia.org/w/index.php?title=") for url in urls)
    assert all(len(d.text.split()) >= 300 for d in documents.values())
    n_passages = sum(len(passages_of(d)) for d in documents.values())
    assert 3000 <= n_passages <= 4000  # a demo index that builds in about a minute on 2 cores
    attribution = (SOURCES / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY-SA" in attribution and "enwiki-latest-pages-articles1" in attribution


@pytest.mark.parametrize("item", QUESTIONS["questions"], ids=lambda q: q["passage_id"])
def test_each_demo_question_has_a_passage_holding_its_answer(
    documents: dict[str, Document], item: dict[str, str]
) -> None:
    doc_id = item["passage_id"].split("#")[0]
    passages = {p.id: p for p in passages_of(documents[doc_id])}
    assert item["answer"] in passages[item["passage_id"]].text
    assert passages[item["passage_id"]].title == item["title"]


@pytest.mark.slow
def test_default_encoder_ranks_the_answer_passage_first(documents: dict[str, Document]) -> None:
    """The real all-MiniLM-L6-v2 over the first passages of the answer and distractor articles."""
    from app.retrieval.encoders import load_encoder
    from app.retrieval.memory_store import MemoryStore
    from app.retrieval.retriever import Retriever
    from app.retrieval.store import PassageIndex

    encoder = load_encoder("default", "sentence-transformers")
    doc_ids = [q["passage_id"].split("#")[0] for q in QUESTIONS["questions"]] + DISTRACTORS
    passages = [p for doc_id in doc_ids for p in passages_of(documents[doc_id])[:6]]
    index = PassageIndex.build(passages, encoder.encode_passages(passages), encoder.fingerprint)
    retriever = Retriever(encoder, MemoryStore(index))
    questions = [q["question"] for q in QUESTIONS["questions"]]
    top = retriever.retrieve(questions, 3)
    assert [hits[0].passage.id for hits in top] == [q["passage_id"] for q in QUESTIONS["questions"]]
    # the default model is normalized, so scores are cosines
    assert all(-1.0 <= h.score <= 1.0 + 1e-5 for hits in top for h in hits)
    assert np.allclose(np.linalg.norm(encoder.encode_questions(questions), axis=1), 1.0, atol=1e-5)
