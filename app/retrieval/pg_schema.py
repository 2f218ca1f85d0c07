"""The Postgres store's tables, its migrations (range 1xx) and the DDL of one collection.

    lorag_collections       one row per named index: encoder fingerprint, dim, chunk_words and
                            how its HNSW index is built (precision, m, ef_construction)
    lorag_store             (101; dropped by 103: which index a replica serves is the fleet's
                            to say, lorag_fleet.active_index in app/fleet/pg_ledger.py)
    lorag_documents         (collection_id, doc_id) -> title, metadata jsonb (what filters match)
    lorag_passages_<id>     one table per collection: pid (identity), doc_id, ordinal, the
                            Passage's id, title and text, `embedding vector(dim)`, and (102)
                            `terms tsvector`, `term_count int`: the sparse search's words

Why a table per collection, not one table with an untyped `vector` column: pgvector's HNSW
index needs a typed column (or a typed expression: `(embedding::vector(384))`), so one shared
table would need a partial expression index per collection (`WHERE collection_id = 7`), and the
planner uses a partial index only when it can prove the query's predicate implies the index's,
which a generic plan of a prepared statement (`collection_id = $1`) does not; nor would the
query's cast always match the index's expression. A table per collection has plain, typed
columns, one HNSW index that every query of it can use, its own planner statistics (a filter's
selectivity is estimated for that corpus), and its deletes and vacuums touch no other corpus.
The price is DDL at `create` (CREATE TABLE and CREATE INDEX, in the same transaction as the
collections row, so a collection exists whole or not at all).

Sparse search (migration 102; the query: app/retrieval/pg_sparse.py): `terms` is generated from
title and text with the 'simple' text search configuration (lower case, no stemming, no stop
words), with a GIN index; `term_count` is the passage's number of terms as the FAISS store's
BM25 counts them (sparse.tokenize: stop words and one-letter words not counted), written by the
store; lorag_collections keeps each collection's passage and term totals (BM25's N and average
length), kept in step by every upsert and delete under the collection's row lock, so a query
reads them in O(1). Why 'simple' and not 'english': bm25s does not stem either, and the query's
terms are cut by that same tokenizer, so both stores score the same terms; 'english' would stem
("capital" and "capitals" one lexeme) and drop its own stop list, a different model.

Precision: the heap always holds float32 `vector(dim)`; `halfvec` builds the HNSW index over
`(embedding::halfvec(dim))` (half the index bytes, bench/RESULTS.md) while scores are still
computed on the full vectors, so an exact scan and reported scores do not change with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql

from app.contracts import Passage
from app.db.migrations import Migration
from app.errors import InvalidInputError
from app.retrieval.sparse import indexed_text, tokenize

Precision = Literal["vector", "halfvec"]
MAX_HNSW_DIM = {"vector": 2000, "halfvec": 4000}  # pgvector's limits for an HNSW index

# a passage's words as the sparse search indexes them (sparse.indexed_text's title, then text);
# IMMUTABLE (to_tsvector with a named configuration is), so it may generate a stored column
_TERMS = "to_tsvector('simple'::regconfig, title || E'\\n' || text)"


def sparse_ddl(collection_id: int) -> list[sql.Composed]:
    """The sparse search's columns and index on one collection's passages table. term_count
    is the store's to write (term_counts below); the rows already there get 0, which
    migration 102 then counts."""
    table = passages_table(collection_id)
    return [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN terms tsvector GENERATED ALWAYS AS ({}) STORED, "
            "ADD COLUMN term_count int NOT NULL DEFAULT 0"
        ).format(table, sql.SQL(_TERMS)),
        sql.SQL("ALTER TABLE {} ALTER COLUMN term_count DROP DEFAULT").format(table),
        sql.SQL("CREATE INDEX {} ON {} USING gin (terms)").format(
            sql.Identifier(f"lorag_passages_{collection_id}_terms"), table
        ),
    ]


def term_counts(titles_texts: list[tuple[str, str]]) -> list[int]:
    """term_count of each (title, text): how many terms BM25 reads in it (as bm25s counts)."""
    texts = [indexed_text(Passage("", "", title, text)) for title, text in titles_texts]
    return [len(terms) for terms in tokenize(texts)]


_COUNT_BATCH = 5000  # passages tokenized per round trip by migration 102


def _sparse(conn: psycopg.Connection) -> None:
    """102: the words of every existing collection's passages, and its BM25 totals."""
    conn.execute(
        "ALTER TABLE lorag_collections ADD COLUMN passages bigint NOT NULL DEFAULT 0, "
        "ADD COLUMN terms bigint NOT NULL DEFAULT 0"
    )
    for (collection_id,) in conn.execute("SELECT id FROM lorag_collections").fetchall():
        table = passages_table(collection_id)
        for ddl in sparse_ddl(collection_id):
            conn.execute(ddl)
        passages = terms = 0
        # in batches from a server-side cursor: a large collection is never in memory whole
        with conn.cursor(name=f"lorag_terms_{collection_id}") as rows:
            rows.execute(sql.SQL("SELECT pid, title, text FROM {} ORDER BY pid").format(table))
            while batch := rows.fetchmany(_COUNT_BATCH):
                counts = term_counts([(title, text) for _, title, text in batch])
                conn.execute(
                    sql.SQL(
                        "UPDATE {} p SET term_count = u.n "
                        "FROM unnest(%s::bigint[], %s::int[]) AS u(pid, n) WHERE p.pid = u.pid"
                    ).format(table),
                    ([r[0] for r in batch], counts),
                )
                passages, terms = passages + len(batch), terms + sum(counts)
        conn.execute(
            "UPDATE lorag_collections SET passages = %s, terms = %s WHERE id = %s",
            (passages, terms, collection_id),
        )


# 103: one source of truth for the active index, the fleet's ledger (what replicas follow by
# LISTEN/NOTIFY); a name the store held and the fleet did not moves there, if the fleet's
# tables exist yet (its migrations run after the store's)
_ACTIVE_TO_THE_FLEET = """
DO $$ BEGIN
    IF to_regclass('lorag_fleet') IS NOT NULL THEN
        UPDATE lorag_fleet SET active_index = (SELECT active FROM lorag_store)
        WHERE active_index IS NULL;
    END IF;
END $$;
DROP TABLE lorag_store;
"""

# migrations 1xx belong to the store; app.db applies them in order, once, under its lock
MIGRATIONS = [
    Migration(
        101,
        "passage store: collections, the active one, documents",
        sql="""
        CREATE TABLE lorag_collections (
            id serial PRIMARY KEY,
            name text NOT NULL UNIQUE,
            encoder text NOT NULL,
            dim int NOT NULL CHECK (dim > 0),
            chunk_words int NOT NULL CHECK (chunk_words > 0),
            precision text NOT NULL CHECK (precision IN ('vector', 'halfvec')),
            hnsw_m int NOT NULL CHECK (hnsw_m >= 2),
            ef_construction int NOT NULL CHECK (ef_construction >= 4),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE lorag_store (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            active text NOT NULL
        );
        CREATE TABLE lorag_documents (
            collection_id int NOT NULL REFERENCES lorag_collections (id) ON DELETE CASCADE,
            doc_id text NOT NULL,
            title text NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}',
            PRIMARY KEY (collection_id, doc_id)
        );
        CREATE INDEX lorag_documents_metadata
            ON lorag_documents USING gin (metadata jsonb_path_ops);
        """,
    ),
    Migration(102, "sparse search: passage terms (tsvector, GIN) and BM25 totals", apply=_sparse),
    Migration(103, "the active index is the fleet's: drop lorag_store", sql=_ACTIVE_TO_THE_FLEET),
]


@dataclass(frozen=True)
class PgIndexSpec:
    """How a new collection's HNSW index is built (pgvector's defaults: m=16,
    ef_construction=64)."""

    precision: Precision = "vector"
    m: int = 16
    ef_construction: int = 64

    def __post_init__(self) -> None:
        if self.precision not in MAX_HNSW_DIM:
            raise InvalidInputError(
                f"precision {self.precision!r} is not one of {sorted(MAX_HNSW_DIM)}"
            )
        if not 2 <= self.m <= 100:
            raise InvalidInputError(f"hnsw m must be in [2, 100], got {self.m}")
        if not 4 <= self.ef_construction <= 1000 or self.ef_construction < 2 * self.m:
            raise InvalidInputError(
                f"ef_construction must be in [max(4, 2*m), 1000], got {self.ef_construction} "
                f"with m={self.m}"
            )

    @property
    def opclass(self) -> str:
        return f"{self.precision}_ip_ops"

    def describe(self) -> str:
        return f"hnsw {self.opclass} m={self.m} ef_construction={self.ef_construction}"


def passages_table(collection_id: int) -> sql.Identifier:
    return sql.Identifier(f"lorag_passages_{collection_id}")


def indexed_expr(
    precision: Precision, dim: int, col: sql.Composable = sql.Identifier("embedding")
) -> sql.Composable:
    """What the HNSW index is built over, and what an index-ordered query must order by."""
    if precision == "vector":
        return col
    return sql.SQL("({}::halfvec({}))").format(col, sql.Literal(dim))


def create_passages_ddl(collection_id: int, dim: int, spec: PgIndexSpec) -> list[sql.Composed]:
    """CREATE TABLE and its indexes for one collection's passages."""
    if dim > MAX_HNSW_DIM[spec.precision]:
        raise InvalidInputError(
            f"an HNSW index over {spec.precision} takes at most {MAX_HNSW_DIM[spec.precision]} "
            f"dimensions, got {dim}"
        )
    table = passages_table(collection_id)
    return [
        sql.SQL(
            """CREATE TABLE {} (
                pid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                doc_id text NOT NULL,
                ordinal int NOT NULL,
                passage_id text NOT NULL,
                title text NOT NULL,
                text text NOT NULL,
                embedding vector({}) NOT NULL,
                UNIQUE (doc_id, ordinal)
            )"""
        ).format(table, sql.Literal(dim)),
        # vectors inline in the heap, never compressed or moved out (they do not compress, and
        # detoasting each row would slow every exact scan); texts may still be toasted
        sql.SQL("ALTER TABLE {} ALTER COLUMN embedding SET STORAGE PLAIN").format(table),
        hnsw_ddl(collection_id, dim, spec),
        *sparse_ddl(collection_id),
    ]


def hnsw_name(collection_id: int) -> str:
    return f"lorag_passages_{collection_id}_hnsw"


def hnsw_ddl(collection_id: int, dim: int, spec: PgIndexSpec) -> sql.Composed:
    """CREATE INDEX of one collection's HNSW index (at create, and after a bulk load)."""
    return sql.SQL(
        "CREATE INDEX {} ON {} USING hnsw ({} {}) WITH (m = {}, ef_construction = {})"
    ).format(
        sql.Identifier(hnsw_name(collection_id)),
        passages_table(collection_id),
        indexed_expr(spec.precision, dim),
        sql.SQL(spec.opclass),
        sql.Literal(spec.m),
        sql.Literal(spec.ef_construction),
    )
