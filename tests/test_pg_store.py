"""The Postgres store (app/retrieval/pg_store.py) against the session's real PostgreSQL+pgvector,
with the FAISS store as the reference: exact-scan parity with a flat index, HNSW recall, live
add/replace/delete, all-or-none upserts, metadata filters that still return k, and refusals
by name (another encoder's index, an unknown one, a database that is down)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from app.contracts import Hit, Passage
from app.db.config import DatabaseConfig
from app.db.pool import Database
from app.errors import DatabaseUnavailable, IndexInvalid, IndexNotFound, InvalidInputError
from app.retrieval.ann import AnnSpec
from app.retrieval.chunking import chunk_document
from app.retrieval.filters import parse
from app.retrieval.interface import DocumentNotFound
from app.retrieval.pg_schema import MIGRATIONS, PgIndexSpec
from app.retrieval.pg_search import PgSearchConfig
from app.retrieval.pg_store import PgCollection, PgStore
from app.retrieval.sources import read_sources
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, Prepared
from tests.hash_encoder import HashEncoder

ROOT = Path(__file__).resolve().parent.parent
DEMO_INDEX = ROOT / "index" / "demo"
DEMO_SOURCE = ROOT / "index" / "sources" / "demo.jsonl"
CORPUS_PASSAGES = 1200  # a slice of the demo corpus: HNSW inserts cost ~1 ms each here
K = 10


@dataclass(frozen=True)
class Corpus:
    fingerprint: str
    documents: list[tuple[Document, list[Passage]]]
    vectors: np.ndarray  # [passages, dim] float32, document then passage order
    queries: np.ndarray  # [n, dim]

    @property
    def passages(self) -> list[Passage]:
        return [p for _, ps in self.documents for p in ps]

    def prepared(self) -> Prepared:
        return Prepared(self.fingerprint, self.documents, self.vectors)

    def faiss_flat(self) -> PassageIndex:
        metadata = {d.id: dict(d.metadata) for d, _ in self.documents}
        spec = AnnSpec(kind="flat")
        return PassageIndex.build(
            self.passages, self.vectors, self.fingerprint, spec=spec, metadata=metadata
        )


def _group(i: int) -> dict[str, Any]:
    return {"group": i % 4, "lang": "en" if i % 3 else "de"}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """The demo corpus's first documents (most tests: each loads it at least once)."""
    return _demo_corpus(CORPUS_PASSAGES)


@pytest.fixture(scope="module")
def whole_corpus() -> Corpus:
    """All of the demo corpus's 3,375 passages (the parity and recall test)."""
    return _demo_corpus(None)


def _demo_corpus(passages: int | None) -> Corpus:
    """The demo corpus's first documents, up to `passages` (None: all of them): the built demo
    index's real vectors (MiniLM) when index/demo exists, else the same documents embedded
    with the hashing encoder. The real vectors' recall on the 229 demo questions, every
    passage, is bench/pg_vs_faiss.py's (bench/RESULTS.md)."""
    try:
        index = PassageIndex.load(DEMO_INDEX)
        stored = index.documents()
        faiss_index = index._index  # the only way to its stored vectors
        pairs = [
            (Document(d.id, d.title, "", _group(i)), list(d.passages)) for i, d in enumerate(stored)
        ]
        fingerprint = index.manifest.encoder
        pids_of = {d.id: d.pids for d in stored}

        def vectors_of(docs: list[tuple[Document, list[Passage]]]) -> np.ndarray:
            pids = np.array([pid for d, _ in docs for pid in pids_of[d.id]], dtype=np.int64)
            return faiss_index.reconstruct_batch(pids)
    except (IndexNotFound, IndexInvalid):
        encoder = HashEncoder()
        source = list(read_sources([DEMO_SOURCE]))
        pairs = [
            (
                Document(d.id, d.title, d.text, _group(i)),
                chunk_document(d.id, d.title, d.text, words=100),
            )
            for i, d in enumerate(source)
        ]
        fingerprint = encoder.fingerprint

        def vectors_of(docs: list[tuple[Document, list[Passage]]]) -> np.ndarray:
            return encoder.encode_passages([p for _, ps in docs for p in ps])

    chosen: list[tuple[Document, list[Passage]]] = []
    for pair in pairs:
        if passages is not None and sum(len(ps) for _, ps in chosen) >= passages:
            break
        chosen.append(pair)
    vectors = np.ascontiguousarray(vectors_of(chosen), dtype=np.float32)
    # queries between passages, not on them: 0.7 of one plus 0.3 of another, plus noise
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(vectors), (2, 40))
    queries = 0.7 * vectors[a] + 0.3 * vectors[b]
    queries += rng.normal(0, 0.02, queries.shape)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return Corpus(fingerprint, chosen, vectors, queries.astype(np.float32))


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database.open(DatabaseConfig(SecretStr(pg_url), connect_timeout_s=2), MIGRATIONS)
    yield database
    database.close()


def _ids(hits: list[Hit]) -> list[str]:
    return [h.passage.id for h in hits]


def _recall(approx: list[list[Hit]], exact: list[list[Hit]]) -> float:
    found = [len(set(_ids(a)) & set(_ids(e))) / len(e) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(found))


def _loaded(db: Database, corpus: Corpus, name: str = "demo", **index: Any) -> PgCollection:
    store = PgStore.open(db, corpus.fingerprint, index=PgIndexSpec(**index))
    collection = store.create(name, dim=corpus.vectors.shape[1])
    collection.upsert(corpus.prepared())
    return collection


def test_exact_scan_matches_faiss_flat_and_hnsw_keeps_recall(
    db: Database, whole_corpus: Corpus
) -> None:
    corpus = whole_corpus
    hnsw = _loaded(db, corpus)
    exact = PgStore.open(db, corpus.fingerprint, search=PgSearchConfig(exact=True)).get("demo")
    flat = corpus.faiss_flat()
    q = corpus.queries
    assert hnsw.count() == (len(flat), flat.document_count)
    assert "Index Scan using lorag_passages_1_hnsw" in hnsw.plan(q[0], K)
    assert "hnsw" not in exact.plan(q[0], K)

    for where in (None, parse({"group": 1}), parse({"lang": {"$ne": "de"}, "group": {"$lt": 2}})):
        want = flat.search(q, K, where)
        got = exact.search(q, K, where)
        assert [_ids(h) for h in got] == [_ids(h) for h in want]
        for g, w in zip(got, want, strict=True):
            assert [h.passage for h in g] == [h.passage for h in w]  # id, doc_id, title, text
            assert np.allclose([h.score for h in g], [h.score for h in w], atol=1e-5, rtol=0)
            assert [dict(h.metadata) for h in g] == [dict(h.metadata) for h in w]
        approx = hnsw.search(q, K, where)
        assert all(len(h) == K for h in approx)
        assert _recall(approx, got) >= 0.95
        if where is not None:
            assert all(where.matches(h.metadata) for hits in approx for h in hits)


def test_a_bulk_load_builds_its_index_after_the_copy_and_is_all_or_nothing(
    db: Database, corpus: Corpus
) -> None:
    store = PgStore.open(db, corpus.fingerprint)
    docs, fp = corpus.documents, corpus.fingerprint
    half = len(docs) // 2
    cut = sum(len(ps) for _, ps in docs[:half])  # passages in the first batch
    first = Prepared(fp, docs[:half], corpus.vectors[:cut])
    rest = Prepared(fp, docs[half:], corpus.vectors[cut:])

    # a batch the database refuses rolls all of it back, the dropped index included
    failed = store.create("failed", dim=corpus.vectors.shape[1])
    nul = Document("nul", "a\x00title", "text", {})
    bad = Prepared(fp, [(nul, [Passage("nul#0", "nul", "a\x00title", "text")])], rest.vectors[:1])
    with pytest.raises(InvalidInputError, match="'failed' refused the documents"):
        failed.load(iter([first, bad]))
    assert failed.count() == (0, 0)
    assert failed.index_bytes() > 0  # its HNSW index is there again

    loaded = store.create("loaded", dim=corpus.vectors.shape[1])
    assert loaded.load(iter([first, rest])) == len(corpus.passages)
    assert loaded.count() == (len(corpus.passages), len(docs))
    # the index built after the COPY (the planner may still scan 1227 rows rather than use it)
    assert loaded.index_bytes() > 0.5 * _loaded(db, corpus, "upserted").index_bytes()
    exact = PgStore.open(db, fp, search=PgSearchConfig(exact=True)).get("loaded")
    want = corpus.faiss_flat().search(corpus.queries, K)
    got = exact.search(corpus.queries, K)
    assert [_ids(h) for h in got] == [_ids(h) for h in want]
    assert _recall(loaded.search(corpus.queries, K), got) >= 0.95
    with pytest.raises(InvalidInputError, match=f"'loaded' holds {len(docs)} documents"):
        loaded.load(iter([first]))


def test_halfvec_index_keeps_recall_and_full_precision_scores(db: Database, corpus: Corpus) -> None:
    half = _loaded(db, corpus, "half", precision="halfvec")
    exact = PgStore.open(db, corpus.fingerprint, search=PgSearchConfig(exact=True)).get("half")
    assert "hnsw halfvec_ip_ops" in half.describe().index_type
    assert "Index Scan using lorag_passages_1_hnsw" in half.plan(corpus.queries[0], K)
    approx, want = half.search(corpus.queries, K), exact.search(corpus.queries, K)
    assert _recall(approx, want) >= 0.95
    pairs = []  # (halfvec search's score, exact scan's) of each passage both found for a query
    for a, w in zip(approx, want, strict=True):
        exact_scores = {h.passage.id: h.score for h in w}
        pairs += [(h.score, exact_scores[h.passage.id]) for h in a if h.passage.id in exact_scores]
    got, expected = np.array(pairs).T
    assert np.allclose(got, expected, atol=1e-6)  # full precision, not the halfvec walk's


# ---- small live corpora: the hashing encoder, a handful of documents -------------------------

ENCODER = HashEncoder()


def _prepare(*docs: Document) -> Prepared:
    chunked = [(d, chunk_document(d.id, d.title, d.text, words=100)) for d in docs]
    vectors = ENCODER.encode_passages([p for _, ps in chunked for p in ps])
    return Prepared(ENCODER.fingerprint, chunked, vectors)


def _query(text: str) -> np.ndarray:
    return ENCODER.encode_questions([text])


@pytest.fixture
def store(db: Database) -> PgStore:
    return PgStore.open(db, ENCODER.fingerprint)


FACTS = [
    Document(
        "zorblax",
        "Zorblax",
        "Zorblax is a purple gas giant orbiting the star Quell.",
        {"kind": "space"},
    ),
    Document(
        "tarn",
        "Tarn of Velm",
        "The Tarn of Velm is a mountain lake with glowing eels.",
        {"kind": "lake"},
    ),
    Document(
        "piano",
        "Piano",
        "A piano sounds when felt hammers strike steel strings.",
        {"kind": "music"},
    ),
]


def _all_texts(collection: PgCollection, query: str) -> list[str]:
    return [h.passage.text for h in collection.search(_query(query), 50)[0]]


def test_live_add_replace_and_delete(store: PgStore) -> None:
    docs = store.create("live", dim=ENCODER.dim)
    outcome = docs.upsert(_prepare(*FACTS))
    assert [(u.doc_id, u.replaced) for u in outcome] == [
        ("zorblax", False),
        ("tarn", False),
        ("piano", False),
    ]
    assert docs.count() == (3, 3)
    assert _ids(docs.search(_query("purple gas giant Quell"), 1)[0]) == ["zorblax#0"]

    new = Document(
        "zorblax",
        "Zorblax",
        "Zorblax was renamed Quellheim by the survey of 2040.",
        {"kind": "renamed"},
    )
    assert docs.upsert(_prepare(new))[0].replaced
    assert docs.count() == (3, 3)
    assert not any("purple" in t for t in _all_texts(docs, "purple gas giant Quell"))
    stored = docs.document("zorblax")
    assert stored is not None and stored.passages[0].text == new.text
    assert stored.metadata == {"kind": "renamed"} and stored.title == "Zorblax"

    with pytest.raises(DocumentNotFound, match="'nope' is not in index 'live'"):
        docs.delete(["tarn", "nope"])
    assert docs.document("tarn") is not None  # the lot was refused
    docs.delete(["tarn"])
    assert docs.document("tarn") is None
    assert docs.count() == (2, 2)
    assert not any("eels" in t for t in _all_texts(docs, "mountain lake glowing eels"))


def test_replicas_replacing_one_document_at_once_leave_one_whole_version(db: Database) -> None:
    # two stores on one database stand for two replicas; each replaces the same document
    # with its own version (of a different passage count) many times, concurrently
    replicas = [PgStore.open(db, ENCODER.fingerprint) for _ in range(2)]
    replicas[0].create("live", dim=ENCODER.dim)
    versions = [
        Document("doc", "Doc", " ".join(["alpha"] * 150)),  # 2 passages
        Document("doc", "Doc", " ".join(["beta"] * 250)),  # 3 passages
    ]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for _ in range(10):
                replicas[i].get("live").upsert(_prepare(versions[i]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    docs = replicas[1].get("live")
    stored = docs.document("doc")
    assert stored is not None
    words = {w for p in stored.passages for w in p.text.split()}
    assert words in ({"alpha"}, {"beta"})  # one version's passages, never a mix
    assert docs.count() == (len(stored.passages), 1)


def test_a_bad_document_rolls_back_the_whole_upsert(store: PgStore) -> None:
    docs = store.create("live", dim=ENCODER.dim)
    docs.upsert(_prepare(*FACTS))
    before = docs.document("piano")
    replacement = Document("piano", "Piano", "Pianos are now made of glass.")
    # the database refuses the second document's passage inside the transaction, after the
    # first one's old passages were deleted and its new ones written (a trigger raising a
    # data exception; NUL, which PostgreSQL cannot hold either, is refused before any store by
    # updates.validate)
    with store._db.connection() as conn:
        conn.execute(
            "CREATE FUNCTION refuse_broken() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.doc_id = 'broken' THEN RAISE EXCEPTION 'broken passage' USING ERRCODE = "
            "'data_exception'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER refuse_broken BEFORE INSERT ON {} FOR EACH ROW "
                "EXECUTE FUNCTION refuse_broken()"
            ).format(docs._table)
        )
    bad = Document("broken", "Broken", "a passage the database refuses")
    with pytest.raises(InvalidInputError, match=r"index 'live' refused the documents.*broken"):
        docs.upsert(_prepare(replacement, bad))
    assert docs.document("piano") == before
    assert docs.document("broken") is None
    assert docs.count() == (3, 3)

    nan = _prepare(replacement)
    nan.vectors[0, 3] = np.nan
    with pytest.raises(InvalidInputError, match="'piano#0' is not finite"):
        docs.upsert(nan)
    short = _prepare(replacement)
    with pytest.raises(InvalidInputError, match=r"shape \[1, 64\]"):
        docs.upsert(Prepared(short.fingerprint, short.documents, short.vectors[:, :32]))
    other = Prepared("another-encoder", short.documents, short.vectors)
    with pytest.raises(IndexInvalid, match=r"'another-encoder'.*'hash-trigram-64'"):
        docs.upsert(other)
    assert docs.document("piano") == before


def _synthetic(n_docs: int, per_doc: int, dim: int = 32) -> Prepared:
    """Random unit vectors, per_doc passages per document, 'group' = doc number % 50 (2%)."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(n_docs * per_doc, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    documents = []
    for i in range(n_docs):
        doc = Document(f"d{i}", f"D{i}", "x", {"group": i % 50})
        documents.append(
            (doc, [Passage(f"d{i}#{j}", doc.id, doc.title, f"p{j}") for j in range(per_doc)])
        )
    return Prepared(ENCODER.fingerprint, documents, vectors)


def test_filters_return_only_matches_and_k_of_them(db: Database) -> None:
    # 3000 passages, 'group' = document % 50; ef_search=20 for k=20, so one graph walk finds
    # fewer than k that match any filter: k come back only by the iterative scan (which, past
    # max_scan_tuples, still hands out the candidates it had set aside), the exact fallback,
    # or an exact scan of the matches, which the planner picks for a selective filter
    prepared = _synthetic(300, 10)
    narrow = PgStore.open(db, ENCODER.fingerprint, search=PgSearchConfig(ef_search=20))
    docs = narrow.create("synthetic", dim=32)
    docs.upsert(prepared)
    with db.connection() as conn:
        conn.execute("ANALYZE")  # as autovacuum would after a load: the planner's row counts
    capped = PgStore.open(
        db, ENCODER.fingerprint, search=PgSearchConfig(ef_search=20, max_scan_tuples=1)
    )
    exact = PgStore.open(db, ENCODER.fingerprint, search=PgSearchConfig(exact=True))
    queries = np.random.default_rng(2).normal(size=(8, 32)).astype(np.float32)
    selective, broad = {"group": 7}, {"group": {"$gte": 10}}  # 2% and 80% of the passages
    for raw in (selective, {"group": {"$in": [3, 4]}}, {"group": {"$lt": 15}}, broad):
        where = parse(raw)
        assert where is not None
        want = exact.get("synthetic").search(queries, 20, where)
        for store in (narrow, capped):
            got = store.get("synthetic").search(queries, 20, where)
            assert all(len(hits) == 20 for hits in got), raw
            assert all(where.matches(h.metadata) for hits in got for h in hits), raw
            # a deliberately narrow walk on random vectors; the defaults' recall is checked on
            # the demo corpus above
            assert _recall(got, want) >= 0.7, raw
    assert "hnsw" not in docs.plan(queries[0], 20, parse(selective))  # scans the 60 matches
    assert "Index Scan using lorag_passages_1_hnsw" in docs.plan(queries[0], 20, parse(broad))

    # a document moved to another group by a replace leaves the old group's results
    moved = Document("d7", "D7", "x", {"group": 8})
    docs.upsert(
        Prepared(ENCODER.fingerprint, [(moved, prepared.documents[7][1])], prepared.vectors[70:80])
    )
    for store in (narrow, exact):
        group7 = store.get("synthetic").search(queries, 20, parse({"group": 7}))
        group8 = store.get("synthetic").search(queries, 60, parse({"group": 8}))
        assert all(h.passage.doc_id != "d7" for hits in group7 for h in hits)
        assert all(len(hits) == 20 for hits in group7)  # 50 passages still match
        assert {"d7", "d8"} <= {h.passage.doc_id for h in group8[0]}
    assert docs.search(queries, 5, parse({"group": 999})) == [[] for _ in range(8)]


def test_another_encoders_index_and_unknown_names_are_refused_by_name(db: Database) -> None:
    ours = PgStore.open(db, "encoder-a")
    ours.create("docs", dim=8)
    theirs = PgStore.open(db, "encoder-b")
    with pytest.raises(IndexInvalid, match=r"'docs'.*'encoder-a'.*'encoder-b'"):
        theirs.get("docs")
    with pytest.raises(IndexInvalid):
        theirs.create("docs", dim=8)  # present, built by another encoder: not handed out
    with pytest.raises(IndexNotFound, match=r"no index 'nope'.*\(there are: docs\)"):
        ours.get("nope")
    with pytest.raises(InvalidInputError, match="index name"):
        ours.get("../etc")
    assert [(i.name, i.encoder) for i in theirs.list()] == [("docs", "encoder-a")]


def test_collections_are_shared_by_replicas_and_each_store_keeps_its_active_one(
    db: Database,
) -> None:
    # which index a replica serves is the fleet's to say (its ledger: tests/test_fleet.py)
    a = PgStore.open(db, ENCODER.fingerprint, active="one")
    b = PgStore.open(db, ENCODER.fingerprint, active="two")
    assert (a.active, b.active) == ("one", "two")
    with pytest.raises(IndexNotFound):
        a.get()  # the active name need not exist yet
    created: list[str] = []
    barrier = threading.Barrier(3)

    def create() -> None:
        barrier.wait()
        created.append(PgStore.open(db, ENCODER.fingerprint).create("two", dim=8).name)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created == ["two"] * 3
    a.create("one", dim=8)
    assert b.get().name == "two" and a.get().name == "one"  # both see every collection
    a.activate("two")
    assert a.active == "two" and b.activate("one").name == "one" and a.active == "two"
    infos = {i.name: i for i in a.list()}
    assert infos["two"].active and not infos["one"].active
    assert infos["two"].kind == "postgres" and infos["two"].passages == 0
    with pytest.raises(IndexNotFound, match="'nope'"):
        a.activate("nope")
    assert a.active == "two"  # a refused activation changes nothing
    with db.connection() as conn:  # the database holds no active index of the store's (103)
        assert conn.execute("SELECT to_regclass('lorag_store')").fetchone() == (None,)


def test_migration_103_moves_the_stores_active_name_to_the_fleet(pg_url: str) -> None:
    from app.db.migrations import migrate
    from app.fleet.pg_ledger import FLEET_MIGRATIONS

    with psycopg.connect(pg_url, autocommit=True) as conn:  # a database of before 103
        migrate(conn, [m for m in MIGRATIONS if m.version < 103] + FLEET_MIGRATIONS)
        conn.execute("INSERT INTO lorag_store (id, active) VALUES (true, 'chosen')")
        migrate(conn, MIGRATIONS)
        assert conn.execute("SELECT active_index FROM lorag_fleet").fetchone() == ("chosen",)
        assert conn.execute("SELECT to_regclass('lorag_store')").fetchone() == (None,)


def test_index_gauges_follow_changes_here_and_refresh_for_other_replicas(
    db: Database, store: PgStore
) -> None:
    seen: list[tuple[str, int, bool]] = []

    def observe(name: str, passages: int, pending: int, *, active: bool) -> None:
        assert pending == 0  # no update log in the database
        seen.append((name, passages, active))

    docs = store.create("demo", dim=ENCODER.dim)  # the store's active name
    docs.upsert(_prepare(FACTS[0]))
    store.watch(observe)
    assert seen == [("demo", 1, True)]  # at start: what is there
    docs.upsert(_prepare(*FACTS[1:]))
    other = store.create("other", dim=ENCODER.dim)
    other.upsert(_prepare(FACTS[0]))
    docs.delete([FACTS[0].id])
    total = sum(len(chunk_document(d.id, d.title, d.text, words=100)) for d in FACTS)
    first = len(chunk_document(FACTS[0].id, FACTS[0].title, FACTS[0].text, words=100))
    assert seen[1:] == [
        ("demo", total, True),
        ("other", first, False),
        ("demo", total - first, True),
    ]
    store.activate("other")
    assert seen[-1] == ("other", first, True)
    assert docs.count()[0] == total - first  # the gauges said what the database holds

    # another replica's change reaches these gauges at the fleet's re-check (refresh)
    elsewhere = PgStore.open(db, ENCODER.fingerprint)
    elsewhere.get("demo").upsert(_prepare(FACTS[0]))
    before = len(seen)
    store.refresh()
    assert sorted(seen[before:]) == [("demo", total, False), ("other", first, True)]


def test_a_database_that_is_down_is_a_prompt_503_and_the_store_recovers(
    pg_server, pg_url: str
) -> None:
    db = Database.open(DatabaseConfig(SecretStr(pg_url), connect_timeout_s=1), MIGRATIONS)
    try:
        docs = PgStore.open(db, ENCODER.fingerprint).create("live", dim=ENCODER.dim)
        docs.upsert(_prepare(*FACTS))
        pg_server.stop()
        try:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="unavailable"):
                docs.search(_query("piano"), 1)
            with pytest.raises(DatabaseUnavailable):
                docs.upsert(_prepare(FACTS[0]))
            assert time.monotonic() - started < 5  # the connect timeout, not a hang
        finally:
            pg_server.start()
        assert _ids(docs.search(_query("felt hammers steel strings"), 1)[0]) == ["piano#0"]
    finally:
        db.close()
