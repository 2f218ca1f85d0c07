"""Live index updates: what one POST /documents costs, and what the log costs at start.

For an index of `--n` passages (random unit 384-d vectors, so the sizes are cheap to make) of
each kind asked for, it times, as medians over `--ops` operations:

    append     one update-log record (one 100-word passage) written and fsynced
    apply      the same record applied to FAISS + docstore (add_with_ids)
    delete     one document deleted (logged, fsynced, removed or tombstoned)
    refresh    the per-request check for other writers (two stat calls)
    replay     loading the index with `--ops` records in its log, minus loading it without
    compact    writing the snapshot that folds them

and, with `--embed`, the default encoder's time for one document of ~100 words (the dominant
cost of an add).

    .venv/bin/python -m bench.index_updates --n 100000 --kinds flat hnsw --embed
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from app.contracts import Passage
from app.retrieval.ann import AnnSpec
from app.retrieval.live import LiveIndex
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, Prepared

DIM = 384
TEXT = " ".join(["word"] * 100)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)  # [n, DIM]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.2f} ms"


def run(n: int, kind: str, ops: int, folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    passages = [Passage(f"b{i}#0", f"b{i}", "", TEXT) for i in range(n)]
    t = time.perf_counter()
    PassageIndex.build(passages, unit(rng, n), "bench", spec=AnnSpec(kind=kind)).save(folder)  # type: ignore[arg-type]
    built = time.perf_counter() - t
    live = LiveIndex.open(folder)
    adds: list[float] = []
    for i in range(ops):
        prepared = Prepared(
            "bench",
            [(Document(f"new{i}", "", TEXT), [Passage(f"new{i}#0", f"new{i}", "", TEXT)])],
            unit(rng, 1),
        )
        t = time.perf_counter()
        live.upsert(prepared)
        adds.append(time.perf_counter() - t)
    deletes: list[float] = []
    for i in range(ops):
        t = time.perf_counter()
        live.delete([f"b{i}"])
        deletes.append(time.perf_counter() - t)
    refreshes: list[float] = []
    for _ in range(1000):
        t = time.perf_counter()
        live.refresh()
        refreshes.append(time.perf_counter() - t)
    log_bytes = live.log_bytes
    t = time.perf_counter()
    PassageIndex.load(folder)
    load_with_log = time.perf_counter() - t
    t = time.perf_counter()
    live.compact()
    compact = time.perf_counter() - t
    t = time.perf_counter()
    PassageIndex.load(folder)
    load_clean = time.perf_counter() - t  # the same passages, from the snapshot alone
    replay = load_with_log - load_clean
    return {
        "kind": kind,
        "passages": f"{n:,}",
        "build + save": f"{built:.1f} s",
        "load": f"{load_clean:.2f} s",
        "add (log+fsync+apply)": ms(adds),
        "delete": ms(deletes),
        "refresh": f"{statistics.median(refreshes) * 1e6:.1f} us",
        f"replay {2 * ops} records": f"{replay:.2f} s ({log_bytes / 2**20:.1f} MiB log)",
        "compact": f"{compact:.2f} s",
    }


def embed_cost() -> str:
    from app.retrieval.config import EncoderSpec
    from app.retrieval.updates import prepare

    encoder = EncoderSpec().load()  # the packaged all-MiniLM-L6-v2
    prose = (
        "The harbour town grew around a salt market. Ships from the north brought timber and "
        "iron, and the merchants built warehouses of red brick along the quay. "
    ) * 4
    docs = [Document(f"d{i}", "Harbour", prose) for i in range(16)]
    prepare(docs[:2], encoder, words=100)  # warm-up
    samples = []
    for doc in docs:
        t = time.perf_counter()
        prepare([doc], encoder, words=100)
        samples.append(time.perf_counter() - t)
    t = time.perf_counter()
    prepare(docs, encoder, words=100)
    batch = (time.perf_counter() - t) / len(docs)
    return f"one document {ms(samples)}; in a batch of 16, {batch * 1000:.1f} ms per document"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw"])
    p.add_argument("--ops", type=int, default=200)
    p.add_argument("--embed", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for kind in args.kinds:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(args.n, kind, args.ops, Path(tmp) / "idx"))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(row[k] for k in keys) + " |")
    if args.embed:
        print("embedding (default encoder):", embed_cost())


if __name__ == "__main__":
    main()
