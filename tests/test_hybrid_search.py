"""Sparse (BM25) and hybrid (reciprocal rank fusion) search on the FAISS store: what BM25 finds
that dense misses, the fusion against a hand computation, live add/replace/delete reaching the
sparse index (a deleted passage never comes back: txtai #601), a reload after a kill -9 (no clean
close) giving the same results, the metadata filter, and /ask's `retrieval` through the real app.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from app.contracts import Hit, Passage
from app.retrieval import ann
from app.retrieval.filters import parse
from app.retrieval.fusion import rrf
from app.retrieval.live import LiveIndex
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, prepare
from tests.hash_encoder import HashEncoder

ENC = HashEncoder()
# many passages in the question's words, one holding its rare term amid other words
FILLER = [
    ("bolts", "The part number of the steel bolt is printed on the box of bolts."),
    ("nuts", "The part number of each nut is printed on the nut box label."),
    ("washers", "Part numbers of washers are printed on the washer box."),
    ("screws", "The part number of a screw is printed on the screw box."),
    ("rivets", "Each rivet box shows the rivet part number printed in red."),
    ("bins", "The part number is printed on every storage bin."),
    (
        "hinge",
        "Catalogue entry QX7731: a brass hinge for oak cabinets, sold in pairs with matching "
        "brass fittings and an illustrated guide for kitchen doors.",
    ),
]
QUESTION = "What is the part number QX7731 printed on?"


def _index(docs: list[tuple[str, str]], **metadata: Mapping[str, object]) -> PassageIndex:
    passages = [Passage(f"{d}#0", d, d.title(), t) for d, t in docs]
    return PassageIndex.build(
        passages, ENC.encode_passages(passages), ENC.fingerprint, metadata=metadata
    )


def _ids(hits: list[Hit]) -> list[str]:
    return [h.passage.doc_id for h in hits]


def _search(index: PassageIndex, question: str, k: int, mode: str, **kw: object) -> list[Hit]:
    vectors = None if mode == "sparse" else ENC.encode_questions([question])
    return index.search(vectors, k, mode=mode, texts=[question], **kw)[0]  # type: ignore[arg-type]


def test_sparse_finds_the_exact_term_that_dense_misses() -> None:
    index = _index(FILLER)
    dense = _search(index, QUESTION, 3, "dense")
    assert "hinge" not in _ids(dense)  # the premise: trigrams favour the wordier passages
    sparse = _search(index, QUESTION, 3, "sparse")
    assert _ids(sparse)[0] == "hinge"  # QX7731 is the rarest term: the highest IDF
    assert _search(index, "zebra giraffe", 3, "sparse") == []  # no shared term: nothing
    with pytest.raises(Exception, match="texts"):
        index.search(ENC.encode_questions([QUESTION]), 3, mode="sparse")


def test_hybrid_is_the_reciprocal_rank_fusion_of_both_lists() -> None:
    index = _index(FILLER)
    for question in [QUESTION, "printed box label", "brass cabinets"]:
        dense = _search(index, question, 20, "dense")
        sparse = _search(index, question, 20, "sparse")
        by_hand: dict[str, float] = {}
        for hits in (dense, sparse):
            for rank, h in enumerate(hits, start=1):
                by_hand[h.passage.id] = by_hand.get(h.passage.id, 0.0) + 1 / (60 + rank)
        first_seen = list(dict.fromkeys(h.passage.id for h in dense + sparse))
        expected = sorted(first_seen, key=lambda p: -by_hand[p])[:4]
        hybrid = _search(index, question, 4, "hybrid")
        assert [h.passage.id for h in hybrid] == expected
        assert [h.score for h in hybrid] == pytest.approx([by_hand[p] for p in expected])
    # ties keep the first list's order; each passage counted once per list
    a, b, c = (Hit(Passage(x, x, x, x), 0.0) for x in "abc")
    assert [h.passage.id for h in rrf([[a, b], [b, a]], 2)] == ["a", "b"]
    fused = rrf([[a, b], [b, c]], 3, rrf_k=0)  # a 1/1, b 1/2 + 1/1, c 1/2
    assert [(h.passage.id, h.score) for h in fused] == [("b", 1.5), ("a", 1.0), ("c", 0.5)]
    tied = rrf([[a, b], [c, b]], 3, rrf_k=0)  # all 1.0: the order they were first met
    assert [h.passage.id for h in tied] == ["a", "b", "c"]


def _live(path: Path) -> LiveIndex:
    live = LiveIndex.create(
        path, fingerprint=ENC.fingerprint, dim=ENC.dim, spec=ann.AnnSpec(kind="flat"),
        chunk_words=50,
    )  # fmt: skip
    _upsert(live, FILLER[:5])
    return live


def _upsert(live: LiveIndex, docs: list[tuple[str, str]], **meta: object) -> None:
    documents = [Document(d, d.title(), t, dict(meta)) for d, t in docs]
    live.upsert(prepare(documents, ENC, words=live.index.manifest.chunk_words))


def test_live_add_replace_delete_reach_the_sparse_index(tmp_path: Path) -> None:
    live = _live(tmp_path / "live")
    everything = "quasar pulsar part number printed box"
    assert "star" not in _ids(_search(live.index, everything, 50, "sparse"))
    _upsert(live, [("star", "A quasar outshines its galaxy.")])
    assert _ids(_search(live.index, "quasar", 5, "sparse")) == ["star"]
    _upsert(live, [("star", "A pulsar spins fast.")])  # replaced: the old words are gone
    assert _search(live.index, "quasar", 5, "sparse") == []
    assert _ids(_search(live.index, "pulsar", 5, "sparse")) == ["star"]
    live.delete(["star"])
    for mode in ("sparse", "hybrid"):
        assert "star" not in _ids(_search(live.index, everything, 50, mode))
        assert "star" not in _ids(_search(live.index, "pulsar", 50, mode))


def test_sparse_results_survive_a_reload_without_a_clean_close(tmp_path: Path) -> None:
    path = tmp_path / "live"
    live = _live(path)
    _upsert(live, [FILLER[6], ("star", "A quasar with a part number.")])
    _upsert(live, [("bolts", "Bolts are now sold by weight, no part number printed.")])
    live.delete(["nuts"])
    questions = [QUESTION, "part number printed box", "quasar weight"]
    before = [_search(live.index, q, 10, "sparse") for q in questions]
    assert (path / "updates.log").stat().st_size > 0  # the updates are only in the log
    crashed = tmp_path / "crashed"  # the folder as a kill -9 leaves it: never closed
    shutil.copytree(path, crashed)
    reloaded = PassageIndex.load(crashed, expect_fingerprint=ENC.fingerprint)
    after = [_search(reloaded, q, 10, "sparse") for q in questions]
    assert [[(h.passage.id, h.score) for h in r] for r in after] == [
        [(h.passage.id, h.score) for h in r] for r in before
    ]
    # and both equal a sparse index built afresh over the surviving documents
    survivors = [(d.id, " ".join(p.text for p in d.passages)) for d in reloaded.documents()]
    fresh = _index(sorted(survivors))
    assert [_ids(_search(fresh, q, 10, "sparse")) for q in questions] == [_ids(r) for r in after]


def test_sparse_search_applies_the_filter_inside() -> None:
    docs = [(f"d{i}", f"Box {i}: the part number is printed on box {i}.") for i in range(40)]
    metadata = {d: {"year": 2000 + i % 4} for i, (d, _) in enumerate(docs)}
    index = _index(docs, **metadata)
    where = parse({"year": {"$gte": 2003}})
    assert where is not None
    ranked = _search(index, "part number printed box 7", 40, "sparse")
    matching = [h.passage.id for h in ranked if where.matches(metadata[h.passage.doc_id])]
    filtered = _search(index, "part number printed box 7", 6, "sparse", where=where)
    assert [h.passage.id for h in filtered] == matching[:6]  # k matching, in BM25 order
    hybrid = _search(index, "part number printed box 7", 6, "hybrid", where=where)
    assert len(hybrid) == 6 and all(where.matches(h.metadata) for h in hybrid)


def test_ask_retrieval_sparse_through_the_app(client_factory) -> None:  # type: ignore[no-untyped-def]
    client = client_factory("t5", retrieval="sparse")  # LORAG_RETRIEVAL=sparse
    question = "Which lake has glowing eels?"

    def ask(**body: object) -> list[dict[str, object]]:
        resp = client.post("/ask", json={"question": question, "top_k": 3, **body})
        assert resp.status_code == 200, resp.text
        passages: list[dict[str, object]] = resp.json()["passages"]
        return passages

    sparse = ask(retrieval="sparse")
    assert sparse[0]["doc_id"] == "tarn"
    # BM25 returns only passages sharing a term: "lake", "glowing", "eels" are all in one
    assert [p["doc_id"] for p in sparse] == ["tarn"]
    assert ask() == sparse  # the server default
    dense = ask(retrieval="dense")
    assert len(dense) == 3 and dense[0]["doc_id"] == "tarn"
    assert dense[0]["score"] != sparse[0]["score"]  # a cosine, not BM25's
    hybrid = ask(retrieval="hybrid")
    assert hybrid[0]["doc_id"] == "tarn" and hybrid[0]["score"] == pytest.approx(2 / 61)
    resp = client.post("/ask", json={"question": question, "retrieval": "bm42"})
    assert resp.status_code == 422 and "retrieval" in resp.text and "bm42" in resp.text
    assert np.isfinite(float(sparse[0]["score"]))  # type: ignore[arg-type]


def test_a_passage_deleted_during_a_rebuild_is_not_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from app.retrieval import sparse as sparse_module

    index = sparse_module.SparseIndex(
        [(0, Passage("a#0", "a", "A", "quasar one")), (1, Passage("b#0", "b", "B", "quasar two"))]
    )
    started, go = threading.Event(), threading.Event()
    tokenize = sparse_module.tokenize

    def slow(texts: list[str]) -> list[list[str]]:
        if len(texts) == 2:  # the build's: pause it while a delete comes in
            started.set()
            go.wait(10)
        return tokenize(texts)

    monkeypatch.setattr(sparse_module, "tokenize", slow)
    out: list[list[tuple[int, float]]] = []
    searcher = threading.Thread(target=lambda: out.extend(index.search(["quasar"], 5)))
    searcher.start()
    assert started.wait(10)
    index.remove([0])  # after the build read the passages, before it finished
    go.set()
    searcher.join(10)
    assert [pid for pid, _ in out[0]] == [1]  # built with pid 0, masked at once
    assert [pid for pid, _ in index.search(["quasar"], 5)[0]] == [1]  # and rebuilt without it
