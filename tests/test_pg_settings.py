"""LORAG_PG_EF_SEARCH, LORAG_PG_PRECISION, LORAG_PG_HNSW_M, LORAG_PG_EF_CONSTRUCTION and
LORAG_PG_EXACT reach the Postgres store through app/wiring.py's open_store (the one place every
caller opens it), against the session's real PostgreSQL: the transaction a search runs in has
the configured hnsw.ef_search, a new collection's HNSW index has the configured precision and
graph (m, ef_construction), and an exact store scans (no HNSW index in its plan) and returns
numpy's exact top k. A graph pgvector would refuse is refused when the settings load."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from app.contracts import Passage
from app.retrieval import pg_search
from app.retrieval.pg_schema import PgIndexSpec
from app.retrieval.pg_search import PgSearchConfig
from app.retrieval.updates import Document, Prepared
from app.settings import Settings
from app.wiring import opened_store

FINGERPRINT = "synthetic-384"
DIM = 384  # rows wide enough that the planner walks the HNSW index, not scans 1000 rows
K = 3


def _corpus(n: int) -> Prepared:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    documents = [
        (Document(f"d{i}", f"D{i}", "x", {}), [Passage(f"d{i}#0", f"d{i}", f"D{i}", f"p{i}")])
        for i in range(n)
    ]
    return Prepared(FINGERPRINT, documents, vectors)


def test_the_defaults_are_the_stores_own() -> None:
    settings = Settings()
    assert settings.pg_search == PgSearchConfig()
    assert settings.pg_index == PgIndexSpec()


def test_an_hnsw_build_pgvector_would_refuse_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAG_PG_HNSW_M", "48")
    monkeypatch.setenv("LORAG_PG_EF_CONSTRUCTION", "64")
    with pytest.raises(ValueError, match=r"LORAG_PG_EF_CONSTRUCTION \(64\) must be at least"):
        Settings()


def test_pg_settings_reach_the_store(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAG_STORE", "postgres")
    monkeypatch.setenv("LORAG_DATABASE_URL", pg_url)
    monkeypatch.setenv("LORAG_PG_EF_SEARCH", "37")
    monkeypatch.setenv("LORAG_PG_PRECISION", "halfvec")
    monkeypatch.setenv("LORAG_PG_HNSW_M", "24")
    monkeypatch.setenv("LORAG_PG_EF_CONSTRUCTION", "96")

    seen: list[tuple[str, str]] = []  # (hnsw.ef_search, enable_indexscan) inside each search
    configure = pg_search.configure

    def spy(conn: psycopg.Connection, config: PgSearchConfig, k: int, *, exact: bool) -> None:
        configure(conn, config, k, exact=exact)
        row = conn.execute(
            "SELECT current_setting('hnsw.ef_search'), current_setting('enable_indexscan')"
        ).fetchone()
        assert row is not None
        seen.append((row[0], row[1]))

    monkeypatch.setattr(pg_search, "configure", spy)
    corpus = _corpus(1000)
    queries = corpus.vectors[:5] * 0.8 + corpus.vectors[5:10] * 0.2  # [5, DIM]
    truth = np.argsort(-(queries @ corpus.vectors.T), axis=1)[:, :K]  # [5, K] rows
    with opened_store(Settings(), FINGERPRINT) as store:
        notes = store.create("notes", dim=DIM)
        notes.upsert(corpus)
        assert notes.describe().index_type.startswith("hnsw halfvec_ip_ops")
        with psycopg.connect(pg_url) as conn:  # the index as PostgreSQL holds it
            row = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname LIKE 'lorag_passages_%_hnsw'"
            ).fetchone()
        assert row is not None and "m='24'" in row[0] and "ef_construction='96'" in row[0]
        notes.search(queries[:1], K)
        assert seen[-1] == ("37", "on")
        assert "lorag_passages_1_hnsw" in notes.plan(queries[0], K)

    monkeypatch.setenv("LORAG_PG_EXACT", "true")
    with opened_store(Settings(), FINGERPRINT) as store:
        notes = store.get("notes")
        hits = notes.search(queries, K)
        assert seen[-1][1] == "off"
        assert "hnsw" not in notes.plan(queries[0], K)
        assert "Seq Scan" in notes.plan(queries[0], K)
        assert [[h.passage.id for h in row] for row in hits] == [
            [f"d{i}#0" for i in row] for row in truth
        ]
