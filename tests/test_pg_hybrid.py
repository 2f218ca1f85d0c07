"""Sparse (BM25 over PostgreSQL's full-text index) and hybrid search in the Postgres store,
against the session's real PostgreSQL, with the FAISS store (bm25s) as the reference: the same
BM25 ranking and scores, hybrid as the RRF of the store's own lists, live add/replace/delete
reaching the sparse index (a deleted passage never comes back: txtai #601) with BM25's totals
kept in step, the metadata filter inside the search, and migration 102 on a database that
already holds a collection."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from psycopg import sql
from pydantic import SecretStr

from app.contracts import Hit, Passage
from app.db.config import DatabaseConfig
from app.db.pool import Database
from app.retrieval import pg_schema
from app.retrieval.filters import parse
from app.retrieval.fusion import rrf
from app.retrieval.pg_schema import MIGRATIONS, PgIndexSpec, create_passages_ddl, passages_table
from app.retrieval.pg_store import PgCollection, PgStore
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, Prepared
from tests.test_hybrid_search import ENC, FILLER, QUESTION

QUESTIONS = [QUESTION, "printed box label", "brass cabinets", "rivet box red", "part number"]


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database.open(DatabaseConfig(SecretStr(pg_url), connect_timeout_s=2), MIGRATIONS)
    yield database
    database.close()


def _passages(docs: Sequence[tuple[str, str]]) -> list[Passage]:
    return [Passage(f"{d}#0", d, d.title(), t) for d, t in docs]


def _prepared(docs: Sequence[tuple[str, str]], **metadata: dict[str, object]) -> Prepared:
    passages = _passages(docs)
    documents = [
        (Document(p.doc_id, p.title, p.text, metadata.get(p.doc_id, {})), [p]) for p in passages
    ]
    return Prepared(ENC.fingerprint, documents, ENC.encode_passages(passages))


def _collection(
    db: Database, name: str, docs: Sequence[tuple[str, str]], **meta: dict[str, object]
) -> PgCollection:
    collection = PgStore.open(db, ENC.fingerprint).create(name, dim=ENC.dim)
    collection.upsert(_prepared(docs, **meta))
    return collection


def _search(
    store: PgCollection | PassageIndex, question: str, k: int, mode: str, **kw: object
) -> list[Hit]:
    vectors = None if mode == "sparse" else ENC.encode_questions([question])
    return store.search(vectors, k, mode=mode, texts=[question], **kw)[0]  # type: ignore[arg-type]


def _scored(hits: list[Hit]) -> list[tuple[float, str]]:
    # BM25 ties (equal scores) may be summed in another order: compare scores, then ids
    return sorted((-round(h.score, 6), h.passage.id) for h in hits)


def test_sparse_is_bm25_as_the_faiss_store_computes_it(db: Database) -> None:
    pg = _collection(db, "parts", FILLER)
    faiss = PassageIndex.build(
        _passages(FILLER), ENC.encode_passages(_passages(FILLER)), ENC.fingerprint
    )
    dense = _search(pg, QUESTION, 3, "dense")
    assert "hinge#0" not in [h.passage.id for h in dense]  # the premise: dense misses it
    for question in QUESTIONS:
        ours, reference = _search(pg, question, 7, "sparse"), _search(faiss, question, 7, "sparse")
        assert _scored(ours) == _scored(reference), question
        assert [h.score for h in ours] == sorted((h.score for h in ours), reverse=True)
    assert _search(pg, QUESTION, 3, "sparse")[0].passage.id == "hinge#0"  # its rare term
    assert _search(pg, "zebra giraffe", 3, "sparse") == []  # no shared term: nothing
    assert _search(pg, "what is the", 3, "sparse") == []  # stop words only
    for question in QUESTIONS:  # the same ranking fused with the same dense list
        ids = [h.passage.id for h in _search(pg, question, 4, "hybrid")]
        assert ids == [h.passage.id for h in _search(faiss, question, 4, "hybrid")], question


def test_hybrid_is_the_rrf_of_the_stores_own_lists(db: Database) -> None:
    pg = _collection(db, "parts", FILLER)
    for question in QUESTIONS:
        dense, sparse = _search(pg, question, 50, "dense"), _search(pg, question, 50, "sparse")
        hybrid = _search(pg, question, 4, "hybrid")
        expected = rrf([dense, sparse], 4)  # both lists read 50 deep, as the FAISS store fuses
        assert [(h.passage.id, h.score) for h in hybrid] == [
            (h.passage.id, h.score) for h in expected
        ]
        # every hit carries the dense half's best cosine for the abstention gate
        assert {h.dense_best for h in hybrid} == {dense[0].score}
    assert all(h.dense_best is None for h in _search(pg, QUESTION, 4, "sparse"))
    with pytest.raises(Exception, match="texts"):
        pg.search(ENC.encode_questions([QUESTION]), 3, mode="hybrid")


def test_live_add_replace_delete_reach_the_sparse_search(db: Database) -> None:
    pg = _collection(db, "live", FILLER[:5])
    everything = "quasar pulsar part number printed box"
    pg.upsert(_prepared([("star", "A quasar outshines its galaxy.")]))
    assert [h.passage.id for h in _search(pg, "quasar", 5, "sparse")] == ["star#0"]
    pg.upsert(_prepared([("star", "A pulsar spins fast.")]))  # replaced: the old words are gone
    assert _search(pg, "quasar", 5, "sparse") == []
    assert [h.passage.id for h in _search(pg, "pulsar", 5, "sparse")] == ["star#0"]
    pg.upsert(_prepared([FILLER[6]]))
    pg.delete(["star", "nuts"])
    for mode in ("sparse", "hybrid"):
        for question in (everything, "pulsar", "nut box label"):
            found = {h.passage.doc_id for h in _search(pg, question, 50, mode)}
            assert not found & {"star", "nuts"}, (mode, question)
    # BM25's totals followed every change: the scores equal a collection built afresh
    survivors = [FILLER[i] for i in (0, 2, 3, 4, 6)]
    fresh = _collection(db, "fresh", survivors)
    for question in QUESTIONS:
        assert _scored(_search(pg, question, 10, "sparse")) == _scored(
            _search(fresh, question, 10, "sparse")
        )


def test_the_filter_applies_inside_the_sparse_search(db: Database) -> None:
    docs = [(f"d{i}", f"Box {i}: the part number is printed on box {i}.") for i in range(40)]
    meta = {d: {"year": 2000 + i % 4} for i, (d, _) in enumerate(docs)}
    pg = _collection(db, "boxes", docs, **meta)
    where = parse({"year": {"$gte": 2003}})  # 10 of the 40
    assert where is not None
    question = "part number printed box 7"
    ranked = _search(pg, question, 40, "sparse")
    matching = [h.passage.id for h in ranked if where.matches(meta[h.passage.doc_id])]
    assert [h.passage.id for h in _search(pg, question, 6, "sparse", where=where)] == matching[:6]
    assert len(_search(pg, question, 20, "sparse", where=where)) == 10  # all that match
    hybrid = _search(pg, question, 6, "hybrid", where=where)
    assert len(hybrid) == 6 and all(where.matches(h.metadata) for h in hybrid)
    assert _search(pg, question, 6, "sparse", where=parse({"year": 1999})) == []


def test_migration_102_indexes_a_collection_that_existed_before_it(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_schema, "_COUNT_BATCH", 3)  # its 7 passages counted in 3 batches
    config = DatabaseConfig(SecretStr(pg_url), connect_timeout_s=2)
    old = Database.open(config, MIGRATIONS[:1])  # a database at 101, with a collection
    prepared = _prepared(FILLER)
    with old.connection() as conn:
        row = conn.execute(
            "INSERT INTO lorag_collections (name, encoder, dim, chunk_words, precision, "
            "hnsw_m, ef_construction) VALUES ('old', %s, %s, 100, 'vector', 16, 64) RETURNING id",
            (ENC.fingerprint, ENC.dim),
        ).fetchone()
        assert row is not None
        cid = row[0]
        conn.execute("INSERT INTO lorag_store (active) VALUES ('old')")
        for ddl in create_passages_ddl(cid, ENC.dim, PgIndexSpec())[:3]:  # 101's table and HNSW
            conn.execute(ddl)
        for i, (doc, (p,)) in enumerate(prepared.documents):
            conn.execute(
                "INSERT INTO lorag_documents (collection_id, doc_id, title) VALUES (%s, %s, %s)",
                (cid, doc.id, doc.title),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (doc_id, ordinal, passage_id, title, text, embedding) "
                    "VALUES (%s, 0, %s, %s, %s, %s)"
                ).format(passages_table(cid)),
                (doc.id, p.id, p.title, p.text, np.asarray(prepared.vectors[i])),
            )
    old.close()
    db = Database.open(config, MIGRATIONS)  # applies 102
    try:
        migrated = PgStore.open(db, ENC.fingerprint).get("old")
        fresh = _collection(db, "fresh", FILLER)
        for question in QUESTIONS:
            assert _scored(_search(migrated, question, 7, "sparse")) == _scored(
                _search(fresh, question, 7, "sparse")
            )
    finally:
        db.close()
