"""FAISS index kinds on clustered synthetic vectors: build time, memory, latency, recall@10.

The data imitates sentence embeddings: a Gaussian mixture of `--clusters` clusters of uneven
size (Zipf-like), each spread anisotropically along its own low-rank subspace (rank 24, scales
falling off like a power law) plus small isotropic noise, then normalized. Queries are fresh
draws from the same mixture, not base vectors. Ground truth: exact inner-product search.

For every kind: build time (train + add), bytes per vector (the serialized index / n),
single-query p50 latency, batched latency per query (batches of --batch), recall@10. Exact and
approximate searches are interleaved query by query (and batch by batch) so that noise from
other processes on this shared machine falls on both; medians throughout. The exact index is
timed once per kind, interleaved with its first sweep setting (at 1M on a loaded 2-core
machine one exact batch of 64 takes over a minute). HNSW's ef_search and
IVF's nprobe are swept; the speedup over exact search at the defaults is printed last.

    .venv/bin/python -m bench.index_types                # 1M x 384, the recorded run
    .venv/bin/python -m bench.index_types --n 100000     # a quick check
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import faiss
import numpy as np

from app.retrieval import ann

logger = logging.getLogger("bench.index_types")

RANK = 24  # intrinsic dimension of each cluster's spread
TOPIC_SIZE = 20  # clusters per topic
TOPIC_SPREAD = 0.5  # cluster centers of one topic: cosine ~ 1 / (1 + 0.5^2) = 0.8
SPREAD = (1.0, 2.0)  # overall size of a cluster, relative to its unit-norm center
# with these, at 100k: mean cosine of the 1st/10th/100th neighbour 0.62/0.38/0.20, and an
# IVF1265 finds 61% / 87% / 96% of the true top-10 scanning 1 / 4 / 16 buckets: a spread-out
# mixture (tighter clusters made every index look perfect at nprobe=1)
K = 10


@dataclass(frozen=True)
class Row:
    kind: str
    params: str
    build_s: float
    bytes_per_vector: float
    recall: float
    single_ms: float  # p50 of one-query searches
    exact_single_ms: float
    batch_ms: float  # p50 of batched searches, per query
    exact_batch_ms: float


def mixture(dim: int, clusters: int, seed: int) -> Callable[[int, np.random.Generator], np.ndarray]:
    """A sampler draw(n, rng) -> [n, dim] float32 unit vectors from one fixed mixture."""
    rng = np.random.default_rng(seed)
    # two levels: clusters gather around topics, so neighbouring clusters overlap
    topics = rng.standard_normal((max(clusters // TOPIC_SIZE, 1), dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    offsets = rng.standard_normal((clusters, dim)).astype(np.float32) / np.sqrt(dim)
    centers = topics[rng.integers(0, len(topics), clusters)] + TOPIC_SPREAD * offsets
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, RANK, dim)).astype(np.float32) / np.sqrt(dim)
    # per-cluster spread: power-law scales along its own subspace, overall size varying 2x
    decay = (1.0 + np.arange(RANK, dtype=np.float32)) ** -0.5
    scales = (decay * rng.uniform(*SPREAD, (clusters, 1))).astype(np.float32)  # [c, RANK]
    weights = 1.0 / (1.0 + np.arange(clusters)) ** 0.5
    weights /= weights.sum()

    def draw(n: int, r: np.random.Generator) -> np.ndarray:
        counts = r.multinomial(n, weights)  # points per cluster
        out = np.empty((n, dim), dtype=np.float32)
        start = 0
        for c in np.flatnonzero(counts):
            m = int(counts[c])
            z = r.standard_normal((m, RANK), dtype=np.float32) * scales[c]  # [m, RANK]
            x = out[start : start + m]
            x[:] = centers[c] + z @ bases[c]  # [m, dim]
            x += 0.03 * r.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            start += m
        return out[r.permutation(n)]  # clusters interleaved, as documents arrive

    return draw


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def serialized_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/tmp")) as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def timed_pair(
    exact: Callable[[np.ndarray], object],
    approx: Callable[[np.ndarray], object],
    chunks: list[np.ndarray],
) -> tuple[float, float]:
    """Median seconds per call of exact and of approx over the same chunks, interleaved."""
    te, ta = [], []
    for x in chunks:
        t0 = time.perf_counter()
        exact(x)
        t1 = time.perf_counter()
        approx(x)
        t2 = time.perf_counter()
        te.append(t1 - t0)
        ta.append(t2 - t1)
    return statistics.median(te), statistics.median(ta)


def timed(run: Callable[[np.ndarray], object], chunks: list[np.ndarray]) -> float:
    seconds = []
    for x in chunks:
        t = time.perf_counter()
        run(x)
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one by one")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timed-batches", type=int, default=4, help="batches timed per setting")
    ap.add_argument("--threads", type=int, default=2, help="FAISS threads while building")
    ap.add_argument(
        "--search-threads",
        type=int,
        default=1,
        help="FAISS threads while searching: on a shared 2-core machine, 2 OpenMP threads "
        "spin-wait on each other (10 ms HNSW queries), so searches are timed on 1",
    )
    ap.add_argument("--kinds", default="hnsw,ivf_sq,ivf_pq")
    ap.add_argument("--ef-construction", type=int, default=ann.AnnSpec().ef_construction)
    ap.add_argument("--ef-search", default="16,32,64,128,256")
    ap.add_argument("--nprobe", default="4,8,16,32,64,128")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    faiss.omp_set_num_threads(args.threads)
    logger.info("threads %d; %d x %d, %d clusters", args.threads, args.n, args.dim, args.clusters)

    draw = mixture(args.dim, args.clusters, seed=0)
    t = time.perf_counter()
    base = draw(args.n, np.random.default_rng(1))  # [n, d]
    queries = draw(args.queries, np.random.default_rng(2))  # [q, d]
    ids = np.arange(args.n, dtype=np.int64)
    logger.info("data in %.1f s", time.perf_counter() - t)

    exact = ann.new_index(args.dim, ann.AnnSpec(kind="flat"), base[:0])
    t = time.perf_counter()
    exact.add_with_ids(base, ids)
    flat_build = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = exact.search(queries, K)  # [q, K] ids
    logger.info("exact ground truth in %.1f s", time.perf_counter() - t)
    flat_spec = ann.AnnSpec(kind="flat")

    def exact_search(x: np.ndarray) -> object:
        return ann.search(exact, x, K, flat_spec)

    singles = [queries[i : i + 1] for i in range(args.single)]
    batches = [queries[i : i + args.batch] for i in range(0, len(queries), args.batch)]
    batches = [b for b in batches if len(b) == args.batch][: args.timed_batches]

    rows: list[Row] = []
    flat_bytes = serialized_bytes(exact) / args.n
    for kind in args.kinds.split(","):
        spec = ann.AnnSpec(kind=kind, ef_construction=args.ef_construction)
        t = time.perf_counter()
        index = ann.new_index(args.dim, spec, base)
        index.add_with_ids(base, ids)
        build = time.perf_counter() - t
        size = serialized_bytes(index) / args.n
        logger.info("%s built in %.1f s, %.0f bytes/vector", ann.describe(index), build, size)
        faiss.omp_set_num_threads(args.search_threads)
        if kind == "hnsw":
            sweep = [replace(spec, ef_search=int(e)) for e in args.ef_search.split(",")]
        else:
            sweep = [replace(spec, nprobe=int(p)) for p in args.nprobe.split(",")]
        exact_ms: tuple[float, float] | None = None  # (single, batched per query)
        for s in sweep:
            label = f"ef_search={s.ef_search}" if kind == "hnsw" else f"nprobe={s.nprobe}"

            def approx(x: np.ndarray, s: ann.AnnSpec = s, index: faiss.Index = index) -> object:
                return ann.search(index, x, K, s)

            _, found = ann.search(index, queries, K, s)
            if exact_ms is None:  # exact and approximate interleaved, once per kind
                e1, a1 = timed_pair(exact_search, approx, singles)
                eb, ab = timed_pair(exact_search, approx, batches)
                exact_ms = (e1, eb)
            else:  # the exact index did not change: its medians from the first setting stand
                (e1, eb), a1, ab = exact_ms, timed(approx, singles), timed(approx, batches)
            row = Row(
                kind,
                label,
                build,
                size,
                recall(found, truth),
                a1 * 1e3,
                e1 * 1e3,
                ab * 1e3 / args.batch,
                eb * 1e3 / args.batch,
            )
            rows.append(row)
            logger.info("%s", row)
        del index
        faiss.omp_set_num_threads(args.threads)

    print(
        f"\n{args.n} x {args.dim}, {args.clusters} clusters, build threads {args.threads}, "
        f"search threads {args.search_threads}, k={K}, "
        f"batches of {args.batch}; flat (exact): build {flat_build:.1f} s, "
        f"{flat_bytes:.0f} bytes/vector"
    )
    print(
        "| kind | params | build s | bytes/vector | recall@10 | single p50 ms (exact) "
        "| batched ms/query (exact) | speedup single / batched |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r.kind} | {r.params} | {r.build_s:.0f} | {r.bytes_per_vector:.0f} | "
            f"{r.recall:.3f} | {r.single_ms:.2f} ({r.exact_single_ms:.1f}) | "
            f"{r.batch_ms:.3f} ({r.exact_batch_ms:.2f}) | "
            f"{r.exact_single_ms / r.single_ms:.0f}x / {r.exact_batch_ms / r.batch_ms:.0f}x |"
        )
    good = [r for r in rows if r.recall >= 0.95]
    if not good:
        print("\nno setting reached recall@10 >= 0.95")
        return
    top = max(good, key=lambda r: r.exact_single_ms / r.single_ms)
    print(
        f"\nfastest at recall@10 >= 0.95: {top.kind} {top.params}, recall {top.recall:.3f}; "
        f"speedup over exact search: {top.exact_single_ms / top.single_ms:.0f}x single query, "
        f"{top.exact_batch_ms / top.batch_ms:.0f}x batched"
    )


if __name__ == "__main__":
    main()
