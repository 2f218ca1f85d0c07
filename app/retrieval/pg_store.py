"""The passage store in PostgreSQL + pgvector: named collections that every replica shares.

    PgStore.open(db, fingerprint, active="demo", search=PgSearchConfig(), index=PgIndexSpec())

applies the store's migrations (app/retrieval/pg_schema.py; once per database, under app.db's
advisory lock) on the replica's one pool (app.db.pool.Database), and serves PassageStore and
Collection (app/retrieval/interface.py) with the FAISS store's semantics: the same Hits (the
Passage, its inner-product score, its document's metadata), the same metadata filter
(MetadataFilter.sql, the SQL rendering of the predicate the FAISS store applies), the same
errors (IndexNotFound naming the known collections, IndexInvalid naming both encoders,
DocumentNotFound refusing a whole delete).

Search (its SQL and settings: app/retrieval/pg_search.py) orders by `<#>` (pgvector's negative
inner product) over the collection's HNSW index, with `hnsw.iterative_scan = relaxed_order`:
when a filter rejects what the graph walk found, the scan goes on until k passages match,
instead of returning fewer; the k found are re-sorted by their full-precision score. If a scan
still ends short of k, that query is answered by an exact scan, as the FAISS store answers a
graph walk that missed a selective filter's passages, so k come back whenever k match.
`PgSearchConfig(exact=True)` disables index scans: every query is an exact scan (sequential,
sorted), the reference the HNSW path is measured against.

Sparse search is BM25 in SQL over PostgreSQL's full-text index (app/retrieval/pg_sparse.py: the
FAISS store's terms and bm25s's formula, so both stores rank alike), and hybrid fuses the two
lists as every store does (fusion.search_by_mode). Each write keeps BM25's totals (passages,
terms) on the collection's row, under the same row lock, in the same transaction.

An upsert is one transaction: lock the collection's row (one writer per collection at a time,
across replicas), delete the replaced documents and their passages, insert the documents, and
COPY the passages in binary (vectors as pgvector's binary format; bench/RESULTS.md has COPY
against executemany). Either all of it commits or none: a row the database refuses or a lost
connection rolls back everything, and a deleted document's text is gone with its rows. (NUL,
which PostgreSQL's text and jsonb cannot hold, never gets here: updates.validate refuses it for
every store alike, naming the document and field.) A first load into an empty collection
(`load`, interface.LoadsInBulk: `lorag index copy`, builds, the demo) is one transaction too,
which drops the HNSW index, COPYs every batch, then builds the index once. Database errors
become DatabaseUnavailable (HTTP 503, the server named without its password: app.db.pool).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from app.contracts import Hit, Passage, SearchMode
from app.db.pool import Database
from app.errors import IndexInvalid, IndexNotFound, InvalidInputError, LoragError
from app.retrieval import pg_search, pg_sparse
from app.retrieval.docstore import StoredDocument
from app.retrieval.filters import MetadataFilter
from app.retrieval.fusion import DEFAULT_FUSION, Fusion, search_by_mode
from app.retrieval.indexes import check_name
from app.retrieval.interface import (
    CollectionInfo,
    DocumentNotFound,
    IndexObserver,
    StoreKind,
    Upserted,
)
from app.retrieval.pg_schema import (
    MIGRATIONS,
    PgIndexSpec,
    create_passages_ddl,
    hnsw_ddl,
    hnsw_name,
    passages_table,
    term_counts,
)
from app.retrieval.pg_search import PgSearchConfig
from app.retrieval.sparse import tokenize
from app.retrieval.updates import Prepared

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Row:
    """A lorag_collections row."""

    id: int
    name: str
    encoder: str
    dim: int
    chunk_words: int
    spec: PgIndexSpec


_COLUMNS = "id, name, encoder, dim, chunk_words, precision, hnsw_m, ef_construction"


def _row(r: tuple[Any, ...]) -> _Row:
    spec = PgIndexSpec(precision=r[5], m=r[6], ef_construction=r[7])
    return _Row(r[0], r[1], r[2], r[3], r[4], spec)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgCollection:
    """One named index: a lorag_passages_<id> table and its documents' rows. Stateless beyond
    its (immutable) collections row, so any thread may use it."""

    def __init__(
        self,
        db: Database,
        row: _Row,
        search: PgSearchConfig,
        is_active: Callable[[str], bool],
        changed: Callable[[PgCollection], None] = lambda _: None,
    ) -> None:
        self.name = row.name
        self.encoder = row.encoder
        self.dim = row.dim
        self.chunk_words = row.chunk_words  # documents added later are chunked alike
        self.spec = row.spec
        self._db = db
        self._id = row.id
        self._table = passages_table(row.id)
        self._search = search
        self._is_active = is_active
        self._changed = changed  # after each change made through it (the metrics gauges)

    # search -------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray | None,  # [n, dim] float32
        k: int,
        where: MetadataFilter | None = None,
        *,
        mode: SearchMode = "dense",
        texts: Sequence[str] | None = None,
        fusion: Fusion = DEFAULT_FUSION,
    ) -> list[list[Hit]]:
        """Top-k per query: dense by inner product, sparse by BM25 over the full-text index
        (app/retrieval/pg_sparse.py), hybrid the two fused as every store fuses them
        (fusion.hybrid: RRF, each list `fusion.depth_for(k)` deep)."""
        return search_by_mode(
            queries,
            k,
            mode,
            texts,
            dense=lambda q, n: self._dense_search(q, n, where),
            sparse=lambda t, n: self._sparse_search(t, n, where),
            fusion=fusion,
        )

    def _sparse_search(
        self, texts: Sequence[str], k: int, where: MetadataFilter | None
    ) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        with self._db.connection() as conn:
            for terms in tokenize(texts):
                if not terms:  # only stop words: no passage shares a term
                    results.append([])
                    continue
                query, params = pg_sparse.statement(self._table, self._id, terms, k, where)
                rows = conn.execute(query, params)
                results.append(
                    [
                        Hit(Passage(pid, doc_id, title, text), float(score), metadata)
                        for pid, doc_id, title, text, score, metadata in rows
                    ]
                )
        return results

    def _dense_search(
        self, queries: np.ndarray, k: int, where: MetadataFilter | None
    ) -> list[list[Hit]]:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(
                f"queries must have shape [n, {self.dim}], got {list(queries.shape)}"
            )
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not np.isfinite(queries).all():
            raise InvalidInputError("query vectors must be finite")
        exact = self._search.exact
        with self._db.connection() as conn:
            pg_search.configure(conn, self._search, k, exact=exact)
            results = []
            for q in queries:  # [dim]
                hits = self._query(conn, q, k, where, exact=exact)
                if len(hits) < k and not exact:  # the scan stopped short: ask exactly
                    log.debug(
                        "index %s: HNSW scan found %d of k=%d, exact scan", self.name, len(hits), k
                    )
                    pg_search.configure(conn, self._search, k, exact=True)
                    hits = self._query(conn, q, k, where, exact=True)
                    pg_search.configure(conn, self._search, k, exact=False)
                results.append(hits)
        return results

    def _query(
        self,
        conn: psycopg.Connection,
        q: np.ndarray,  # [dim]
        k: int,
        where: MetadataFilter | None,
        *,
        exact: bool,
    ) -> list[Hit]:
        query, params = self._statement(q, k, where, exact=exact)
        return [
            Hit(Passage(pid, doc_id, title, text), float(score), metadata)
            for pid, doc_id, title, text, score, metadata in conn.execute(query, params)
        ]

    def _statement(
        self, q: np.ndarray, k: int, where: MetadataFilter | None, *, exact: bool
    ) -> tuple[sql.Composed, list[Any]]:
        return pg_search.statement(
            self._table, self._id, self.dim, self.spec.precision, q, k, where, exact=exact
        )

    def plan(self, query: np.ndarray, k: int, where: MetadataFilter | None = None) -> str:
        """EXPLAIN of one query as search() would run it first (which index, if any)."""
        exact = self._search.exact
        q = np.ascontiguousarray(query, dtype=np.float32)  # [dim]
        with self._db.connection() as conn:
            pg_search.configure(conn, self._search, k, exact=exact)
            stmt, params = self._statement(q, k, where, exact=exact)
            rows = conn.execute(sql.SQL("EXPLAIN ") + stmt, params).fetchall()
        return "\n".join(r[0] for r in rows)

    # changes ------------------------------------------------------------------------------

    def upsert(self, prepared: Prepared) -> list[Upserted]:
        """Add or replace whole documents in one transaction: all or none."""
        vectors, counts = self._checked(prepared)
        ids = [doc.id for doc, _ in prepared.documents]
        try:
            with self._db.connection() as conn:
                self._lock(conn)
                replaced = self._remove(conn, ids)
                self._insert(conn, prepared, vectors, counts)
        except psycopg.DataError as exc:  # a value PostgreSQL cannot hold; rolled back
            raise self._refused(exc) from None
        log.info("index %s: upserted %d documents (%d passages)", self.name, len(ids), len(vectors))
        self._changed(self)
        return [
            Upserted(doc.id, len(passages), doc.id in replaced)
            for doc, passages in prepared.documents
        ]

    def load(self, batches: Iterable[Prepared]) -> int:
        """A first load into this empty collection, all of it in one transaction: the batches'
        documents inserted and their passages COPYed with no HNSW index to keep up, then the
        index built once (CREATE INDEX after a load: 3.6x faster than maintaining it row by row,
        bench/RESULTS.md "The Postgres store against FAISS"), with no statement timeout for
        this transaction only, as a large build outlasts it. Dropping the index locks the
        passages table, so a search of this collection waits for the commit, then sees it
        whole. Returns the passages loaded; InvalidInputError if it holds documents."""
        documents = passages = 0
        try:
            with self._db.connection() as conn:
                self._lock(conn)
                conn.execute("SET LOCAL statement_timeout = 0")
                held = conn.execute(
                    "SELECT count(*) FROM lorag_documents WHERE collection_id = %s", (self._id,)
                ).fetchone()
                if held and held[0]:
                    raise InvalidInputError(
                        f"index {self.name!r} holds {held[0]} documents: a bulk load is for an "
                        "empty index (add or replace documents with upserts)"
                    )
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(hnsw_name(self._id))))
                for prepared in batches:  # each one checked, then written, in this transaction
                    vectors, counts = self._checked(prepared)
                    self._insert(conn, prepared, vectors, counts)
                    documents += len(prepared.documents)
                    passages += len(vectors)
                started = time.perf_counter()
                conn.execute(hnsw_ddl(self._id, self.dim, self.spec))
                built_s = time.perf_counter() - started
        except psycopg.DataError as exc:
            raise self._refused(exc) from None
        log.info(
            "index %s: loaded %d documents (%d passages), its HNSW index built in %.1f s",
            self.name,
            documents,
            passages,
            built_s,
        )
        self._changed(self)
        return passages

    def _checked(self, prepared: Prepared) -> tuple[np.ndarray, list[int]]:
        """prepared's vectors [passages, dim] and BM25 term counts, checked before any write."""
        if prepared.fingerprint != self.encoder:
            raise IndexInvalid(
                f"vectors from encoder {prepared.fingerprint!r}, but index {self.name!r} was "
                f"built with {self.encoder!r}"
            )
        vectors = self._check_vectors(prepared)  # [total passages, dim]
        counts = term_counts(  # BM25's document lengths, outside the transaction
            [(p.title, p.text) for _, passages in prepared.documents for p in passages]
        )
        return vectors, counts

    def _insert(
        self,
        conn: psycopg.Connection,
        prepared: Prepared,
        vectors: np.ndarray,  # [total passages, dim]
        counts: list[int],
    ) -> None:
        """Insert prepared's documents and COPY their passages, in conn's transaction."""
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO lorag_documents (collection_id, doc_id, title, metadata) "
                "VALUES (%s, %s, %s, %s)",
                [(self._id, d.id, d.title, Jsonb(dict(d.metadata))) for d, _ in prepared.documents],
            )
            copy_sql = sql.SQL(
                "COPY {} (doc_id, ordinal, passage_id, title, text, embedding, term_count) "
                "FROM STDIN WITH (FORMAT BINARY)"
            ).format(self._table)
            with cur.copy(copy_sql) as copy:
                copy.set_types(["text", "int4", "text", "text", "text", "vector", "int4"])
                row = 0
                for doc, passages in prepared.documents:
                    for ordinal, p in enumerate(passages):
                        copy.write_row(
                            (doc.id, ordinal, p.id, p.title, p.text, vectors[row], counts[row])
                        )
                        row += 1
        self._count_added(conn, [doc.id for doc, _ in prepared.documents])

    def _refused(self, exc: psycopg.DataError) -> InvalidInputError:
        return InvalidInputError(
            f"index {self.name!r} refused the documents ({_first_line(exc)}); nothing was changed"
        )

    def _check_vectors(self, prepared: Prepared) -> np.ndarray:
        passages = [p for _, doc_passages in prepared.documents for p in doc_passages]
        vectors = prepared.vectors
        if vectors.ndim != 2 or vectors.shape != (len(passages), self.dim):
            raise InvalidInputError(
                f"vectors must have shape [{len(passages)}, {self.dim}], got {list(vectors.shape)}"
            )
        if not np.isfinite(vectors).all():
            row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise InvalidInputError(f"vector of passage {passages[row].id!r} is not finite")
        for doc, doc_passages in prepared.documents:
            if not doc_passages:
                raise InvalidInputError(f"document {doc.id!r} has no passages")
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Delete whole documents in one transaction; an unknown id refuses the lot."""
        ids = list(dict.fromkeys(doc_ids))
        with self._db.connection() as conn:
            self._lock(conn)
            found = {
                r[0]
                for r in conn.execute(
                    "SELECT doc_id FROM lorag_documents "
                    "WHERE collection_id = %s AND doc_id = ANY(%s)",
                    (self._id, ids),
                )
            }
            for doc_id in ids:
                if doc_id not in found:
                    raise DocumentNotFound(doc_id, self.name)
            self._remove(conn, ids)
        log.info("index %s: deleted %d documents", self.name, len(ids))
        self._changed(self)

    def _lock(self, conn: psycopg.Connection) -> None:
        """One writer per collection at a time, whichever replica; released at commit."""
        conn.execute("SELECT 1 FROM lorag_collections WHERE id = %s FOR NO KEY UPDATE", (self._id,))

    def _remove(self, conn: psycopg.Connection, ids: list[str]) -> set[str]:
        """Delete these documents and their passages; the ids that were there."""
        cur = conn.execute(
            "DELETE FROM lorag_documents WHERE collection_id = %s AND doc_id = ANY(%s) "
            "RETURNING doc_id",
            (self._id, ids),
        )
        gone = {r[0] for r in cur}
        if gone:
            conn.execute(
                sql.SQL(
                    "WITH gone AS (DELETE FROM {} WHERE doc_id = ANY(%s) RETURNING term_count) "
                    "UPDATE lorag_collections c SET passages = c.passages - g.n, "
                    "terms = c.terms - g.words FROM (SELECT count(*) AS n, "
                    "coalesce(sum(term_count), 0) AS words FROM gone) g WHERE c.id = %s"
                ).format(self._table),
                (list(gone), self._id),
            )
        return gone

    def _count_added(self, conn: psycopg.Connection, ids: list[str]) -> None:
        """The sparse search's totals (BM25's N and average length) take in these documents'
        passages; under the collection's row lock, as every write."""
        conn.execute(
            sql.SQL(
                "UPDATE lorag_collections c SET passages = c.passages + a.n, "
                "terms = c.terms + a.words FROM (SELECT count(*) AS n, "
                "coalesce(sum(term_count), 0) AS words FROM {} WHERE doc_id = ANY(%s)) a "
                "WHERE c.id = %s"
            ).format(self._table),
            (ids, self._id),
        )

    # reads --------------------------------------------------------------------------------

    def document(self, doc_id: str) -> StoredDocument | None:
        with self._db.connection() as conn:
            head = conn.execute(
                "SELECT title, metadata FROM lorag_documents "
                "WHERE collection_id = %s AND doc_id = %s",
                (self._id, doc_id),
            ).fetchone()
            if head is None:
                return None
            rows = conn.execute(
                sql.SQL(
                    "SELECT pid, passage_id, title, text FROM {} WHERE doc_id = %s ORDER BY ordinal"
                ).format(self._table),
                (doc_id,),
            ).fetchall()
        passages = tuple(Passage(pid, doc_id, title, text) for _, pid, title, text in rows)
        return StoredDocument(doc_id, head[0], passages, tuple(r[0] for r in rows), head[1])

    def count(self) -> tuple[int, int]:
        """(passages, documents)."""
        with self._db.connection() as conn:
            row = conn.execute(
                sql.SQL(
                    "SELECT (SELECT count(*) FROM {}), "
                    "(SELECT count(*) FROM lorag_documents WHERE collection_id = %s)"
                ).format(self._table),
                (self._id,),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def passages(self) -> int:
        """The passage total kept on the collection's row by every write (BM25's N): O(1),
        where count() scans the passages table (the gauges read this after each change)."""
        with self._db.connection() as conn:
            row = conn.execute(
                "SELECT passages FROM lorag_collections WHERE id = %s", (self._id,)
            ).fetchone()
        assert row is not None
        return int(row[0])

    def describe(self) -> CollectionInfo:
        passages, documents = self.count()
        return CollectionInfo(
            name=self.name,
            kind="postgres",
            encoder=self.encoder,
            dim=self.dim,
            passages=passages,
            documents=documents,
            index_type=self.spec.describe(),
            active=self._is_active(self.name),
            chunk_words=self.chunk_words,
        )

    def index_bytes(self) -> int:
        """Bytes on disk of the HNSW index (for benches and /index)."""
        with self._db.connection() as conn:
            row = conn.execute(
                "SELECT pg_relation_size(%s::regclass)", (hnsw_name(self._id),)
            ).fetchone()
        assert row is not None
        return int(row[0])


class PgStore:
    """The named collections of one database, and which one this replica serves by default.

    The collections are shared by every replica; the active one is this object's, as in the
    FAISS store: the fleet decides it (app/fleet: PUT /index writes the ledger's active index,
    lorag_fleet.active_index, and every replica follows it by LISTEN/NOTIFY, a replica that
    starts included), so the database holds it once.

    Watched: the metrics gauges get a collection's passage count when watching starts (the
    active one), after every upsert and delete made through this store, and at activation.
    Changes another replica makes reach this replica's gauges at refresh(), which the fleet
    calls at each sync (every LORAG_FLEET_RECHECK_S, 5 s, and on each notification), or
    sooner at this replica's next change of that collection."""

    kind: StoreKind = "postgres"

    def __init__(
        self,
        db: Database,
        fingerprint: str,
        search: PgSearchConfig,
        index: PgIndexSpec,
        active: str = "demo",
    ) -> None:
        self.fingerprint = fingerprint
        self._db = db
        self._search = search
        self._index = index
        self._cache: dict[str, PgCollection] = {}  # collections never change once created
        self._guard = threading.Lock()
        self._active = check_name(active)
        self._observer: IndexObserver | None = None

    @classmethod
    def open(
        cls,
        db: Database,
        fingerprint: str,
        *,
        active: str = "demo",
        search: PgSearchConfig | None = None,
        index: PgIndexSpec | None = None,
    ) -> PgStore:
        """The store on `db`, its migrations applied; `active` is the collection get() serves
        until activate() (it need not exist: get() then names what does)."""
        db.migrate(MIGRATIONS)
        return cls(db, fingerprint, search or PgSearchConfig(), index or PgIndexSpec(), active)

    @property
    def where(self) -> str:
        return f"database {self._db.redacted_url}"

    @property
    def active(self) -> str:
        return self._active

    def get(self, name: str | None = None) -> PgCollection:
        name = check_name(name) if name is not None else self.active
        with self._guard:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        with self._db.connection() as conn:
            r = conn.execute(
                f"SELECT {_COLUMNS} FROM lorag_collections WHERE name = %s", (name,)
            ).fetchone()
            names = (
                []
                if r
                else [
                    n for (n,) in conn.execute("SELECT name FROM lorag_collections ORDER BY name")
                ]
            )
        if r is None:
            known = ", ".join(names) or "none"
            raise IndexNotFound(f"no index {name!r} in {self.where} (there are: {known})")
        row = _row(r)
        if row.encoder != self.fingerprint:
            raise IndexInvalid(
                f"index {name!r} in {self.where} was built with encoder {row.encoder!r}, but "
                f"the server uses encoder {self.fingerprint!r}; rebuild the index with this "
                "encoder or configure the one it was built with"
            )
        collection = PgCollection(self._db, row, self._search, self._is_active, self._changed)
        with self._guard:
            return self._cache.setdefault(name, collection)

    def create(self, name: str, *, dim: int, chunk_words: int = 100) -> PgCollection:
        """The named collection, created empty (table and HNSW index, one transaction) with
        this store's encoder and index spec if it is absent; safe when replicas race."""
        check_name(name)
        if dim < 1 or chunk_words < 1:
            raise InvalidInputError(f"dim and chunk_words must be >= 1, got {dim}, {chunk_words}")
        spec = self._index
        with self._db.connection() as conn:
            r = conn.execute(
                "INSERT INTO lorag_collections "
                "(name, encoder, dim, chunk_words, precision, hnsw_m, ef_construction) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
                (
                    name,
                    self.fingerprint,
                    dim,
                    chunk_words,
                    spec.precision,
                    spec.m,
                    spec.ef_construction,
                ),
            ).fetchone()
            if r is not None:  # ours: the rest of the collection in the same transaction
                for ddl in create_passages_ddl(r[0], dim, spec):
                    conn.execute(ddl)
                log.info(
                    "created index %s in %s (%d-d, %s)", name, self.where, dim, spec.describe()
                )
        return self.get(name)

    def activate(self, name: str) -> PgCollection:
        """Serve `name` by default (it must exist, with this encoder); one assignment, so
        atomic for readers. The caller records it for the fleet (Fleet.activate_index)."""
        collection = self.get(name)
        previous, self._active = self._active, name
        if previous != name:
            log.info("active index: %s -> %s", previous, name)
        self._changed(collection)
        return collection

    def _is_active(self, name: str) -> bool:
        return self._active == name

    def watch(self, observer: IndexObserver) -> None:
        """Report collection sizes to `observer` (see the class): the active one now."""
        self._observer = observer
        try:
            self._changed(self.get())
        except LoragError as exc:  # not there (yet), or the database is down: the next change
            log.warning("no index gauges for %r yet: %s", self._active, exc)

    def refresh(self) -> None:
        """The sizes again of the collections this replica has opened (one row read each):
        what other replicas changed reaches the gauges here (the fleet's re-check)."""
        if self._observer is None:
            return
        with self._guard:
            opened = list(self._cache.values())
        for collection in opened:
            self._changed(collection)

    def _changed(self, collection: PgCollection) -> None:
        observer = self._observer
        if observer is None:
            return
        try:
            passages = collection.passages()
        except LoragError as exc:  # the change committed; only its gauge waits for the next
            log.warning("index gauges of %r not updated: %s", collection.name, exc)
            return
        observer(collection.name, passages, 0, active=self._is_active(collection.name))

    def list(self) -> list[CollectionInfo]:
        """Every collection, another encoder's too (its info names that encoder)."""
        with self._db.connection() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM lorag_collections ORDER BY name")
            collections = [
                PgCollection(self._db, _row(r), self._search, self._is_active) for r in rows
            ]
        return [c.describe() for c in collections]

    def close(self) -> None:
        """Nothing of its own to close: the pool is the caller's (shared with the fleet)."""
