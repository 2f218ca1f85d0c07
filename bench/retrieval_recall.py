"""Retrieval recall@k on the demo corpus for dense, sparse (BM25) and hybrid (RRF) search, and
what keeping the BM25 index in step costs (bench/answer_quality.py --retrieval-only runs it).

The answerable question sets (bench/data/answerable_*.jsonl, scripts/make_answer_sets.py) name
the passage that holds each answer: recall@k is the share of questions whose passage is among
the k retrieved (`doc` the share whose document is). The retriever is the server's (the
default encoder, the demo index through the FAISS store, Retriever.retrieve); no generation.

The rebuild figures: bm25s has no incremental add or delete, so the first sparse search after a
change rebuilds the index (app/retrieval/sparse.py); timed over the demo's passages and over
ten copies of them, cold (every passage tokenized) and after one added passage (tokens cached).

With LORAG_STORE=postgres (and LORAG_DATABASE_URL: a database holding the demo collection, e.g.
`lorag index copy index/demo`) the same table is the Postgres store's (BM25 in SQL,
app/retrieval/pg_sparse.py), followed by the baseline it was chosen over: PostgreSQL's own
ts_rank_cd over the same OR query (no IDF).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.contracts import SEARCH_MODES, Passage
from app.retrieval.sparse import SparseIndex

DATA = Path(__file__).parent / "data"
KS = (1, 3, 5, 10, 20)


def read(name: str) -> list[dict[str, Any]]:
    with (DATA / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def recall_table(retriever: Any, sets: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "set       mode     n    " + " ".join(f"R@{k:<3d}" for k in KS) + "  doc@5  ms/question"
    ]
    for name, questions in sets.items():
        texts = [q["question"] for q in questions]
        for mode in SEARCH_MODES:
            retriever.retrieve(texts[:2], max(KS), mode=mode)  # warm (a first BM25 build)
            t0 = time.perf_counter()
            hits = retriever.retrieve(texts, max(KS), mode=mode)
            ms = (time.perf_counter() - t0) * 1000 / len(texts)
            ids = [[h.passage.id for h in row] for row in hits]
            docs = [[h.passage.doc_id for h in row[:5]] for row in hits]
            recall = [
                sum(q["passage_id"] in row[:k] for q, row in zip(questions, ids, strict=True))
                / len(questions)
                for k in KS
            ]
            doc5 = sum(q["doc_id"] in d for q, d in zip(questions, docs, strict=True)) / len(docs)
            lines.append(
                f"{name:9s} {mode:8s} {len(questions):4d} "
                + " ".join(f"{r:5.3f}" for r in recall)
                + f"  {doc5:5.3f}  {ms:8.1f}"
            )
    return lines


def rebuild_times(passages: Sequence[Passage], copies: Sequence[int] = (1, 10)) -> list[str]:
    lines = []
    for n in copies:
        rows = [
            (i * len(passages) + j, dataclasses.replace(p, id=f"{p.id}~{i}"))
            for i in range(n)
            for j, p in enumerate(passages)
        ]
        sparse = SparseIndex(rows)
        t0 = time.perf_counter()
        sparse.search(["warm"], 1)
        cold = time.perf_counter() - t0
        sparse.add(len(rows), Passage("new#0", "new", "New", "a passage added live"))
        t0 = time.perf_counter()
        sparse.search(["added"], 1)
        warm = time.perf_counter() - t0
        sparse.remove([0])
        t0 = time.perf_counter()
        sparse.search(["deleted"], 1)
        deleted = time.perf_counter() - t0
        lines.append(
            f"  {len(rows):6d} passages: first build {cold:.3f} s (tokenizing every passage); "
            f"rebuild after an add {warm:.3f} s, after a delete {deleted:.3f} s"
        )
    return lines


def ts_rank_table(collection: Any, sets: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Sparse recall@k on the Postgres store ranked by ts_rank_cd instead of BM25: the same
    candidates (the question's terms OR'd), the same filter-free search."""
    from psycopg import sql

    from app.retrieval.pg_sparse import or_query
    from app.retrieval.sparse import tokenize

    query = sql.SQL(
        "SELECT passage_id FROM {} WHERE terms @@ %s::tsquery "
        "ORDER BY ts_rank_cd(terms, %s::tsquery) DESC, pid LIMIT %s"
    ).format(collection._table)
    lines = ["set       rank        n    " + " ".join(f"R@{k:<3d}" for k in KS)]
    with collection._db.connection() as conn:
        for name, questions in sets.items():
            ids = []
            for terms in tokenize([q["question"] for q in questions]):
                tsq = or_query(terms)
                rows = conn.execute(query, (tsq, tsq, max(KS))).fetchall() if terms else []
                ids.append([r[0] for r in rows])
            recall = [
                sum(q["passage_id"] in row[:k] for q, row in zip(questions, ids, strict=True))
                / len(questions)
                for k in KS
            ]
            lines.append(
                f"{name:9s} ts_rank_cd {len(questions):4d} " + " ".join(f"{r:5.3f}" for r in recall)
            )
    return lines


def run(settings: Any) -> None:
    from app.retrieval.retriever import Retriever
    from app.retrieval.store import PassageIndex
    from app.wiring import opened_store

    encoder = settings.encoder_spec.load()
    sets = {
        "heldout": read("answerable_heldout.jsonl"),
        "train": read("answerable_train.jsonl"),
    }
    sets["all"] = sets["heldout"] + sets["train"]
    with opened_store(settings, encoder.fingerprint) as store:
        print(f"store: {store.kind}", flush=True)
        retriever = Retriever(encoder, store)
        print("\n".join(recall_table(retriever, sets)), flush=True)
        if store.kind == "postgres":
            print("\n".join(ts_rank_table(store.get(), sets)), flush=True)
            return
    passages = list(PassageIndex.load(settings.index_path).passages)
    print(f"BM25 rebuild (app/retrieval/sparse.py), demo corpus of {len(passages)} passages:")
    print("\n".join(rebuild_times(passages)), flush=True)
