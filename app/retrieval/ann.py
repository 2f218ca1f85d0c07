"""FAISS index kinds for the passage store: exact, graph (HNSW) and inverted-file (IVF) indexes.

Every index made here measures inner product (the vectors are normalized embeddings, so this is
cosine similarity) and stores the caller's own stable int64 ids (`add_with_ids`), so a deleted
passage is filtered and removed by id, not by position. Flat and HNSW indexes number their vectors
0..n-1 and get ids from an `IndexIDMap2` wrapper; IVF indexes store ids in their lists natively,
and must not be wrapped: IndexIDMap compacts its id table after `remove_ids` as if the inner index
renumbered its vectors, which IVF does not, so removal through the wrapper scrambles the ids.

The trade-off, measured on clustered 384-d vectors on 2 shared cores (bench/RESULTS.md):

    flat    exact; 1544 bytes/vector; a query scans everything (~0.5 µs per vector there)
    hnsw    a graph over the full vectors; recall@10 0.996 at ef_search=32 (200k), 1816
            bytes/vector, slowest build (~120 vectors/s there), cannot remove a vector
            (deletes are filtered, then compacted by a rebuild)
    ivf_sq  k-means buckets, 1 byte per dimension (SQ8); 398 bytes/vector, recall@10 0.974 at
            nprobe=32 (1M), removes in place
    ivf_pq  k-means buckets, dim/8 bytes per vector; 63 bytes/vector, recall@10 ~0.73 (1M):
            for memory, not for quality

Search parameters (efSearch, nprobe) and the exclusion of deleted ids go in per call through
`faiss.SearchParameters*`, never by setting fields on the shared index, so concurrent searches
with different parameters do not race.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import faiss
import numpy as np

from app.errors import InvalidInputError

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf_pq", "ivf_sq"]
INDEX_KINDS: tuple[IndexKind, ...] = get_args(IndexKind)
SQ_TYPES = {
    "SQ8": faiss.ScalarQuantizer.QT_8bit,
    "SQ6": faiss.ScalarQuantizer.QT_6bit,
    "SQ4": faiss.ScalarQuantizer.QT_4bit,
    "SQfp16": faiss.ScalarQuantizer.QT_fp16,
}
PQ_BITS = 8  # 256 centroids per subquantizer: one byte per subvector
PQ_MIN_TRAIN = 1 << PQ_BITS  # k-means needs at least as many points as centroids
MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
MAX_TRAIN_PER_LIST = 64  # a sample of 64 points per list trains as well as all of them
MAX_NLIST = 65536

# automatic choice by corpus size (bench/index_types.py; the reasons are in resolve_kind)
FLAT_MAX = 200_000


@dataclass(frozen=True)
class AnnSpec:
    """Which index to build and how to search it; `kind="auto"` picks by corpus size."""

    kind: IndexKind | Literal["auto"] = "auto"
    hnsw_m: int = 32  # graph neighbours per node (2*M on the bottom layer)
    ef_construction: int = 200  # candidate list while inserting; build time grows with it
    ef_search: int = 64  # candidate list while searching (at least k is used)
    nlist: int | None = None  # IVF buckets; None: 4*sqrt(n), clamped to the training set
    nprobe: int = 32  # IVF buckets scanned per query
    pq_m: int | None = None  # PQ subquantizers (bytes per vector); None: dim/8; must divide dim
    sq: str = "SQ8"  # scalar quantizer of ivf_sq

    def __post_init__(self) -> None:
        if self.kind != "auto" and self.kind not in INDEX_KINDS:
            raise InvalidInputError(
                f"index kind {self.kind!r} is not one of {['auto', *INDEX_KINDS]}"
            )
        positive = {
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
        }
        if self.nlist is not None:
            positive["nlist"] = self.nlist
        if self.pq_m is not None:
            positive["pq_m"] = self.pq_m
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if self.hnsw_m < 2:
            raise InvalidInputError(f"hnsw_m must be at least 2, got {self.hnsw_m}")
        if self.nlist is not None and self.nlist > MAX_NLIST:
            raise InvalidInputError(f"nlist must be at most {MAX_NLIST}, got {self.nlist}")
        if self.sq not in SQ_TYPES:
            raise InvalidInputError(f"sq {self.sq!r} is not one of {sorted(SQ_TYPES)}")


def resolve_kind(spec: AnnSpec, n: int) -> IndexKind:
    """The kind to build for n vectors: spec.kind, or for "auto" the choice by size.

    Measured by bench/index_types.py on 2 shared cores (bench/RESULTS.md). Up to FLAT_MAX the
    exact scan costs at most ~0.1 s per query (0.4-0.5 µs per vector there), nothing to build,
    and deletes remove in place, so there is nothing to win. Beyond it IVF-SQ8: at 1M it kept
    recall@10 0.974 at nprobe=32, 58x faster than exact for one query, at 398 bytes per vector,
    built in 401 s, and compaction removes deleted ids in place. HNSW reached higher recall
    (0.996 at ef_search=32, 200k) but took 1816 bytes per vector, built at ~120 vectors/s here
    (27 min for 200k) and cannot remove a vector (compaction is a rebuild), so it is chosen
    only by name, where cores and memory are plentiful and the corpus changes little.
    """
    if spec.kind != "auto":
        return spec.kind
    if n < 0:
        raise InvalidInputError(f"corpus size must be non-negative, got {n}")
    return "flat" if n <= FLAT_MAX else "ivf_sq"


def default_nlist(n: int) -> int:
    """About 4*sqrt(n) buckets, but never more than n/39 (too few points to train each)."""
    wanted = round(4 * math.sqrt(max(n, 1)))
    return max(1, min(wanted, n // MIN_POINTS_PER_LIST, MAX_NLIST))


def pq_subquantizers(dim: int, spec: AnnSpec) -> int:
    if spec.pq_m is None:
        # one byte per 8 dimensions; for dims not divisible by 8, the largest divisor below
        return max(m for m in range(1, max(dim // 8, 1) + 1) if dim % m == 0)
    if dim % spec.pq_m:
        raise InvalidInputError(f"pq_m={spec.pq_m} does not divide the vector dimension {dim}")
    return spec.pq_m


def new_index(dim: int, spec: AnnSpec, train_vectors: np.ndarray) -> faiss.Index:
    """An empty, trained index of the spec's kind; add with `add_with_ids(x, ids)`.

    train_vectors [n, dim] decide "auto" (by n) and train IVF kinds (on a seeded sample of at
    most 64 per bucket); flat and HNSW need none. Too few vectors for the asked nlist shrink
    it, with a warning; too few for any IVF index raise InvalidInputError.
    """
    if dim < 1:
        raise InvalidInputError(f"vector dimension must be positive, got {dim}")
    train = np.asarray(train_vectors, dtype=np.float32)
    if train.ndim != 2 or (train.shape[0] and train.shape[1] != dim):
        raise InvalidInputError(
            f"train_vectors must have shape [n, {dim}], got {list(train.shape)}"
        )
    n = int(train.shape[0])
    kind = resolve_kind(spec, n)
    ip = faiss.METRIC_INNER_PRODUCT
    sub: faiss.Index
    if kind == "flat":
        sub = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        sub = faiss.IndexHNSWFlat(dim, spec.hnsw_m, ip)
        sub.hnsw.efConstruction = spec.ef_construction
        sub.hnsw.efSearch = spec.ef_search  # the default when search() gets no params
    else:
        nlist = _nlist_for(kind, n, spec)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf_pq":
            m = pq_subquantizers(dim, spec)
            sub = faiss.IndexIVFPQ(quantizer, dim, nlist, m, PQ_BITS, ip)
        else:
            sub = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, SQ_TYPES[spec.sq], ip)
        sub.nprobe = min(spec.nprobe, nlist)
        sub.train(_sample(train, MAX_TRAIN_PER_LIST * max(nlist, PQ_MIN_TRAIN // 4)))
    index = sub if kind in ("ivf_pq", "ivf_sq") else faiss.IndexIDMap2(sub)
    logger.info("new %s index for %d-d vectors (%d training vectors)", describe(index), dim, n)
    return index


def _nlist_for(kind: IndexKind, n: int, spec: AnnSpec) -> int:
    need = PQ_MIN_TRAIN if kind == "ivf_pq" else 1
    if n < max(need, MIN_POINTS_PER_LIST):
        raise InvalidInputError(
            f"{kind} needs at least {max(need, MIN_POINTS_PER_LIST)} training vectors, got {n}; "
            "use index type 'flat' for a corpus this small"
        )
    nlist = default_nlist(n) if spec.nlist is None else spec.nlist
    cap = max(1, n // MIN_POINTS_PER_LIST)
    if nlist > cap:
        logger.warning(
            "nlist=%d needs %d training vectors, got %d; using nlist=%d",
            nlist,
            nlist * MIN_POINTS_PER_LIST,
            n,
            cap,
        )
        nlist = cap
    return nlist


def _sample(vectors: np.ndarray, at_most: int) -> np.ndarray:
    if vectors.shape[0] <= at_most:
        return np.ascontiguousarray(vectors)
    rows = np.random.default_rng(0).choice(vectors.shape[0], at_most, replace=False)
    return np.ascontiguousarray(vectors[np.sort(rows)])  # [at_most, dim]


def inner(index: faiss.Index) -> Any:
    """The vector index itself: inside the IndexIDMap2 wrapper (flat, HNSW) or the IVF index.

    Typed Any: FAISS's bundled stubs lack the subclasses' fields (hnsw, nlist, pq, sq).
    """
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexIDMap2):
        return faiss.downcast_index(outer.index)
    if isinstance(outer, faiss.IndexIVF):
        return outer
    raise InvalidInputError(f"expected an index from new_index, got {type(outer).__name__}")


def ids_of(index: faiss.Index) -> np.ndarray:
    """Every id stored in `index` [ntotal] int64 (in storage order, not sorted)."""
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexIDMap2):
        return faiss.vector_to_array(outer.id_map).astype(np.int64)
    invlists = inner(index).invlists
    parts = [
        faiss.rev_swig_ptr(invlists.get_ids(j), invlists.list_size(j)).copy()
        for j in range(invlists.nlist)
        if invlists.list_size(j)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def kind_of(index: faiss.Index) -> IndexKind:
    sub = inner(index)
    if isinstance(sub, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(sub, faiss.IndexIVFPQ):
        return "ivf_pq"
    if isinstance(sub, faiss.IndexIVFScalarQuantizer):
        return "ivf_sq"
    if isinstance(sub, faiss.IndexFlat):
        return "flat"
    raise InvalidInputError(f"unsupported FAISS index {type(sub).__name__}")


def describe(index: faiss.Index) -> str:
    """A FAISS-factory-like name with parameters, for the manifest: "IDMap2,HNSW32,Flat IP"."""
    sub = inner(index)
    kind = kind_of(index)
    if kind == "flat":
        return "IDMap2,Flat IP"
    if kind == "hnsw":
        m, efc = sub.hnsw.nb_neighbors(1), sub.hnsw.efConstruction
        return f"IDMap2,HNSW{m},Flat IP efConstruction={efc}"
    if kind == "ivf_pq":
        return f"IVF{sub.nlist},PQ{sub.pq.M}x{sub.pq.nbits} IP"
    qtype = {v: k for k, v in SQ_TYPES.items()}.get(sub.sq.qtype, f"SQ?{sub.sq.qtype}")
    return f"IVF{sub.nlist},{qtype} IP"


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    spec: AnnSpec,
    exclude: np.ndarray | None = None,
    include: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores [n, k] float32, ids [n, k] int64) per query row; id -1 pads a short row.

    `exclude` holds int64 ids that must never come back (deleted passages); `include`, if
    given, the only ids that may (a metadata filter's passages: exclude is then ignored). Both
    are applied inside the search, so a row still has k results when k allowed vectors are
    reachable (for IVF: within the nprobe scanned buckets; for HNSW: within the ef_search
    candidates; `exact_among` completes a short HNSW row).
    """
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)  # [n, d]
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise InvalidInputError(
            f"queries must have shape [n, {index.d}], got {list(queries.shape)}"
        )
    sel: Any = None
    if include is not None:
        sel = faiss.IDSelectorBatch(np.asarray(include, dtype=np.int64))
    elif exclude is not None and len(exclude):
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(exclude, dtype=np.int64)))
    kind = kind_of(index)
    params: Any  # the stubs lack SearchParametersHNSW and the IVF fields
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(spec.ef_search, k)
    elif kind in ("ivf_pq", "ivf_sq"):
        params = faiss.SearchParametersIVF()
        params.nprobe = min(spec.nprobe, inner(index).nlist)
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel  # IndexIDMap2 translates positions to our ids; IVF stores our ids
    scores, ids = index.search(queries, k, params=params)  # [n, k] each
    return scores, ids


def exact_among(
    index: faiss.Index, queries: np.ndarray, k: int, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact top-k by inner product among `ids` only (scores [n, k], ids [n, k], -1 padded),
    from the stored vectors; None for IVF kinds, which keep no id -> vector map."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap2):
        return None
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.vstack([outer.reconstruct(int(i)) for i in ids]) if len(ids) else None
    n = queries.shape[0]
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    found = np.full((n, k), -1, dtype=np.int64)
    if vectors is None:
        return scores, found
    sims = np.ascontiguousarray(queries, dtype=np.float32) @ vectors.T  # [n, len(ids)]
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [n, <=k]
    scores[:, : top.shape[1]] = np.take_along_axis(sims, top, axis=1)
    found[:, : top.shape[1]] = ids[top]
    return scores, found


def supports_remove(index: faiss.Index) -> bool:
    """Whether `remove_ids` works in place (flat, IVF); HNSW's graph cannot drop a node."""
    return kind_of(index) != "hnsw"


def rebuild_without(index: faiss.Index, spec: AnnSpec, drop_ids: np.ndarray) -> faiss.Index:
    """A new index holding every vector of `index` except `drop_ids`; `index` is untouched.

    Flat and IVF: a clone with `remove_ids` (IVF keeps its trained buckets). HNSW: a fresh graph
    over the reconstructed (exact, stored) vectors with the spec's build parameters. The caller
    swaps the returned index in, so searches still running on the old one finish unharmed.
    """
    drop = np.ascontiguousarray(drop_ids, dtype=np.int64)
    if supports_remove(index):
        clone = faiss.clone_index(index)
        if len(drop):
            clone.remove_ids(faiss.IDSelectorBatch(drop))
        return clone
    ids = ids_of(index)  # [ntotal]
    vectors = inner(index).reconstruct_n(0, index.ntotal)  # [ntotal, d]
    keep = ~np.isin(ids, drop)
    graph = inner(index).hnsw
    same = replace(
        spec, kind="hnsw", hnsw_m=graph.nb_neighbors(1), ef_construction=graph.efConstruction
    )
    rebuilt = new_index(index.d, same, vectors[keep])
    if keep.any():
        rebuilt.add_with_ids(np.ascontiguousarray(vectors[keep]), ids[keep])
    return rebuilt
