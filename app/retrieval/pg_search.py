"""How the Postgres store answers a dense query: its settings and its one SQL statement.

One statement per query vector. Inside a MATERIALIZED CTE the k nearest passages by `<#>`
(pgvector's negative inner product), ordered by the indexed expression itself, which is what
lets the planner walk the collection's HNSW index (pg_schema.indexed_expr; a halfvec index
orders by the halfvec cast); a metadata filter is an EXISTS on the document's row, so the
planner can check it per passage as the walk yields them (HNSW index scan, nested loop) or,
for a selective filter, scan just the matching documents' passages exactly. Outside the CTE,
the k are re-sorted by the full-precision score (and pid, for ties), which puts right the
relaxed order of an iterative scan and of a halfvec walk, and joined to their documents'
metadata.

`configure` sets the transaction's knobs with SET LOCAL (set_config(..., true)): ef_search
(at least k), hnsw.iterative_scan = relaxed_order (a filtered walk goes on until k passages
match instead of returning fewer), hnsw.max_scan_tuples (how far it goes), and for an exact
scan enable_indexscan = off (a sequential scan and a sort: HNSW indexes have no bitmap scan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from app.errors import InvalidInputError
from app.retrieval.filters import MetadataFilter
from app.retrieval.pg_schema import Precision, indexed_expr

MAX_EF_SEARCH = 1000  # pgvector's limit


@dataclass(frozen=True)
class PgSearchConfig:
    """How queries are answered: exact scans, or HNSW with this candidate list and scan cap."""

    exact: bool = False
    # hnsw.ef_search, at least k is used. On the demo corpus at m=16 (bench/pg_vs_faiss.py):
    # recall@10 1.0 at 40 (pgvector's default) and 100 for real questions; 0.982 and 0.999 for
    # points between passages, for 0.1 ms more per query
    ef_search: int = 100
    max_scan_tuples: int = 20_000  # hnsw.max_scan_tuples: how far an iterative scan goes

    def __post_init__(self) -> None:
        if not 1 <= self.ef_search <= MAX_EF_SEARCH:
            raise InvalidInputError(
                f"ef_search must be in [1, {MAX_EF_SEARCH}], got {self.ef_search}"
            )
        if self.max_scan_tuples < 1:
            raise InvalidInputError(f"max_scan_tuples must be >= 1, got {self.max_scan_tuples}")


def configure(conn: psycopg.Connection, config: PgSearchConfig, k: int, *, exact: bool) -> None:
    """This transaction's planner and HNSW settings (they end with it)."""
    ef_search = min(max(config.ef_search, k), MAX_EF_SEARCH)
    conn.execute(
        "SELECT set_config('enable_indexscan', %s, true), "
        "set_config('hnsw.ef_search', %s, true), "
        "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
        "set_config('hnsw.max_scan_tuples', %s, true)",
        ("off" if exact else "on", str(ef_search), str(config.max_scan_tuples)),
    )


def statement(
    table: sql.Identifier,
    collection_id: int,
    dim: int,
    precision: Precision,
    q: np.ndarray,  # [dim] float32
    k: int,
    where: MetadataFilter | None,
    *,
    exact: bool,
) -> tuple[sql.Composed, list[Any]]:
    """The query and its parameters; rows are (passage id, doc id, title, text, score,
    metadata), best first."""
    params: list[Any] = [q]
    filtered: sql.Composable = sql.SQL("")
    if where is not None:
        condition, filter_params = where.sql("d.metadata")
        filtered = sql.SQL(
            "WHERE EXISTS (SELECT 1 FROM lorag_documents d WHERE d.collection_id = %s "
            "AND d.doc_id = p.doc_id AND ({}))"
        ).format(sql.SQL(condition))  # the filter's own SQL; its values are parameters
        params += [collection_id, *filter_params]
    if exact or precision == "vector":
        order: sql.Composable = sql.SQL("p.embedding <#> %s")
    else:
        order = sql.SQL("{} <#> %s::halfvec({})").format(
            indexed_expr("halfvec", dim, sql.SQL("p.embedding")), sql.Literal(dim)
        )
    params += [q, k, collection_id]
    query = sql.SQL(
        """WITH top AS MATERIALIZED (
            SELECT p.pid, p.doc_id, p.passage_id, p.title, p.text,
                   (p.embedding <#> %s) AS distance
            FROM {table} p {filtered}
            ORDER BY {order}
            LIMIT %s)
        SELECT t.passage_id, t.doc_id, t.title, t.text, -t.distance, d.metadata
        FROM top t JOIN lorag_documents d ON d.collection_id = %s AND d.doc_id = t.doc_id
        ORDER BY t.distance, t.pid"""
    ).format(table=table, filtered=filtered, order=order)
    return query, params
