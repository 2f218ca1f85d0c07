"""How the Postgres store answers a sparse query: BM25 in SQL over PostgreSQL's full-text index.

The question's terms are cut by the FAISS store's own tokenizer (app/retrieval/sparse.py:
lower case, stop words and one-letter words dropped, no stemming), and the passages' `terms`
tsvector by the 'simple' configuration (lower case, no stemming; pg_schema.py), so both
stores score the same words. A passage is a candidate when it holds any of the terms (an OR
tsquery over the GIN index: BM25 matches any term, where plainto_tsquery and
websearch_to_tsquery would AND them), inside the metadata filter, so k come back whenever k
candidates match. Candidates are ranked by BM25 as bm25s computes it by default (Lucene's
variant, k1 = 1.5, b = 0.75):

    score(d) = sum over the question's terms t (repeats count again, as in bm25s)
               idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avg|d|))
    idf(t)   = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

tf is the term's number of positions in the passage's tsvector, |d| its number of terms as
bm25s counts them (term_count, written by the store from sparse.tokenize), N and avg|d| the
collection's totals (lorag_collections, kept by every write), df(t) a count over the GIN index
per term. So on ordinary words the scores equal bm25s's (tests/test_pg_hybrid.py); the stores
differ only where PostgreSQL's parser cuts text otherwise than bm25s's regex (a hyphenated word
is indexed whole and as its parts, "U.S." as one word, "foo_bar" as two).

Why not ts_rank_cd: it has no inverse document frequency, so with OR semantics a question's
common words ("state", "first") weigh as much as its rare ones (bench/RESULTS.md, "Hybrid
retrieval", has both on the demo's questions). The cost of BM25 here: a df count per term over
the GIN index, and per candidate (every passage holding any term) its tf of each question term:
the question's lexemes are marked (setweight 'A') and kept (ts_filter) before the unnest, 4.3 ms
a question at k = 50 on the demo corpus (3375 passages) against 15.7 ms unnesting every lexeme.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

from app.retrieval.filters import MetadataFilter

K1 = 1.5  # bm25s's defaults
B = 0.75


def or_query(terms: Sequence[str]) -> str:
    """A tsquery matching any of the terms, each a literal lexeme (no parsing, no stemming)."""
    quoted = (t.replace("\\", "\\\\").replace("'", "''") for t in dict.fromkeys(terms))
    return " | ".join(f"'{t}'" for t in quoted)


def statement(
    table: sql.Identifier,
    collection_id: int,
    terms: Sequence[str],  # the question's terms (sparse.tokenize), repeats kept; not empty
    k: int,
    where: MetadataFilter | None,
) -> tuple[sql.Composed, list[Any]]:
    """The query and its parameters; rows are (passage id, doc id, title, text, BM25 score,
    metadata), best first (ties: the passage stored first, as the FAISS store's lower pid)."""
    filtered: sql.Composable = sql.SQL("")
    filter_params: list[Any] = []
    if where is not None:
        condition, filter_params = where.sql("d.metadata")
        filtered = sql.SQL(
            "AND EXISTS (SELECT 1 FROM lorag_documents d WHERE d.collection_id = %s "
            "AND d.doc_id = p.doc_id AND ({}))"
        ).format(sql.SQL(condition))  # the filter's own SQL; its values are parameters
        filter_params = [collection_id, *filter_params]
    query = sql.SQL(
        """WITH q AS (
            SELECT t.term, quote_literal(t.term)::tsquery AS query
            FROM unnest(%s::text[]) AS t(term)),
        stats AS (
            SELECT passages::float8 AS n, greatest(terms::float8 / greatest(passages, 1), 1)
                   AS avg_len
            FROM lorag_collections WHERE id = %s),
        idf AS (
            SELECT q.term, ln(1 + (s.n - c.df + 0.5) / (c.df + 0.5)) AS idf
            FROM q CROSS JOIN stats s
            CROSS JOIN LATERAL (SELECT count(*) AS df FROM {table} p WHERE p.terms @@ q.query) c),
        top AS MATERIALIZED (
            SELECT p.pid, p.doc_id, p.passage_id, p.title, p.text,
                   sum(i.idf * u.tf / (u.tf + %s * (1 - %s + %s * p.term_count / s.avg_len)))
                   AS score
            FROM {table} p
            CROSS JOIN stats s
            CROSS JOIN LATERAL (  -- only the question's lexemes: marked, kept, unnested
                SELECT lexeme, cardinality(positions)::float8 AS tf
                FROM unnest(ts_filter(setweight(p.terms, 'A', %s::text[]), '{{a}}'))) u
            JOIN idf i ON i.term = u.lexeme
            WHERE p.terms @@ %s::tsquery {filtered}
            GROUP BY p.pid
            ORDER BY score DESC, p.pid
            LIMIT %s)
        SELECT t.passage_id, t.doc_id, t.title, t.text, t.score, d.metadata
        FROM top t JOIN lorag_documents d ON d.collection_id = %s AND d.doc_id = t.doc_id
        ORDER BY t.score DESC, t.pid"""
    ).format(table=table, filtered=filtered)
    params: list[Any] = [
        list(terms),
        collection_id,
        K1,
        B,
        B,
        list(dict.fromkeys(terms)),
        or_query(terms),
        *filter_params,
        k,
        collection_id,
    ]
    return query, params
