"""The passage index: a FAISS index keyed by int64 passage ids, its docstore, and its update log.

    <index>/manifest.json    format version, encoder fingerprint, dim, counts, index kind and
                             search parameters, next passage id, last log seq, checksums
    <index>/index.faiss      faiss.write_index output, passage ids inside (app/retrieval/ann.py)
    <index>/passages.jsonl   the docstore (app/retrieval/docstore.py) ...
    <index>/documents.jsonl  ... passages by id, documents with their passage ids and metadata
    <index>/updates.log      changes acknowledged since this snapshot (app/retrieval/wal.py)

The first four files are a snapshot, checksummed in the manifest; the log grows after it.
`load` reads the snapshot and replays the log on top, so a loaded index holds exactly what was
acknowledged. Format 2 (ids, documents, the log) replaced format 1 (FAISS row = passages.jsonl
line); a format-1 folder is refused with IndexOutdated, which `lorag prepare` answers for the
demo index by rebuilding it, and any other index needs `lorag index build` again.

Passages live in FAISS under stable int64 ids, never reused, so a passage keeps its id when
others are added or deleted. A delete drops the docstore entry at once (so a deleted passage's
text cannot be returned) and makes its ids tombstones, excluded inside every search (ann.search's
IDSelector). Removing vectors from a flat index right away would cost a pass over all of them
per delete (33 ms at 100k passages, bench/RESULTS.md), and an HNSW graph cannot drop a node at
all; so compaction removes the tombstones from flat and IVF indexes in one batched pass, and
rebuilds an HNSW graph once they are a tenth of it. Tombstones need no file: they are the ids
FAISS holds that the docstore does not.

Readers never see half an update: `apply` changes FAISS and the docstore under one lock, which
`search` takes too (a flat search over a few hundred thousand vectors is milliseconds; a
snapshot copies both under it, and writes the copy outside it).

Saving is atomic: the files are written and fsynced in a temporary folder beside the target,
which is then renamed into place (on Linux an existing index is swapped out in one step with
renameat2(RENAME_EXCHANGE)), so a reader sees the old index or the new one, never a mix; as the
log is inside the folder, a snapshot and the truncation of the log are that same one step.
Loading pins the folder with a directory file descriptor for the same reason, and verifies each
file's sha256 against the manifest.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.contracts import Hit, Passage
from app.errors import IndexInvalid, IndexNotFound, InvalidInputError
from app.retrieval import ann, wal
from app.retrieval.ann import AnnSpec
from app.retrieval.docstore import DocStore, StoredDocument, group_by_document

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.jsonl"
DOCUMENTS_FILE = "documents.jsonl"
LOG_FILE = wal.LOG_FILE
DATA_FILES = (INDEX_FILE, PASSAGES_FILE, DOCUMENTS_FILE)  # checksummed in the manifest
REBUILD_FRACTION = 0.1  # compaction rebuilds an index whose tombstones reach this share


class IndexOutdated(IndexInvalid):
    """An index folder in an older format this lorag no longer reads."""


@dataclass(frozen=True)
class IndexManifest:
    encoder: str  # the encoder fingerprint (TextEncoder.fingerprint) the vectors came from
    dim: int
    passage_count: int
    document_count: int = 0
    index_type: str = "IDMap2,Flat IP"  # ann.describe() of the FAISS index
    ann: Mapping[str, Any] = field(default_factory=dict)  # the AnnSpec: kind, search parameters
    next_id: int = 0  # the next passage id to hand out; ids are never reused
    last_seq: int = 0  # the last update-log record folded into this snapshot
    chunk_words: int = 100  # words per passage: documents added later are chunked alike
    metric: str = "inner_product"
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    checksums: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["checksums"] = dict(self.checksums)
        data["ann"] = dict(self.ann)
        return data

    @classmethod
    def from_json(cls, data: object, source: Path) -> IndexManifest:
        if not isinstance(data, dict):
            raise IndexInvalid(f"{source}: expected a JSON object")
        version = data.get("format_version")
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise IndexOutdated(
                f"{source}: index format version {version}, this lorag reads {FORMAT_VERSION} "
                "(stable passage ids and an update log); rebuild it with `lorag index build`"
            )
        if version != FORMAT_VERSION:
            raise IndexInvalid(
                f"{source}: index format version {version!r}, this lorag reads {FORMAT_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        if missing := sorted(names - data.keys()):
            raise IndexInvalid(f"{source}: missing keys {missing}")
        try:
            manifest = cls(**{k: data[k] for k in names})
        except TypeError as exc:
            raise IndexInvalid(f"{source}: {exc}") from exc
        ints = ("dim", "passage_count", "document_count", "next_id", "last_seq", "chunk_words")
        if bad := [k for k in ints if not isinstance(getattr(manifest, k), int)]:
            raise IndexInvalid(f"{source}: {bad} must be integers")
        return manifest

    def spec(self, source: Path) -> AnnSpec:
        try:
            return AnnSpec(**self.ann)
        except (TypeError, InvalidInputError) as exc:
            raise IndexInvalid(f"{source}: bad 'ann' parameters ({exc})") from exc


@dataclass(frozen=True)
class Origin:
    """Which folder generation and how much of its log an in-memory index reflects."""

    device: int
    inode: int
    log_end: int  # bytes of updates.log applied


class PassageIndex:
    """Passages and their vectors; search returns the top-k passages by inner product."""

    def __init__(
        self, manifest: IndexManifest, index: faiss.Index, docs: DocStore, spec: AnnSpec
    ) -> None:
        if index.d != manifest.dim:
            raise IndexInvalid(f"FAISS index is {index.d}-d, the manifest says {manifest.dim}-d")
        ids = _faiss_ids(index)  # [ntotal] int64
        missing = set(docs.pids()) - set(ids.tolist())
        if missing:
            raise IndexInvalid(
                f"FAISS index holds {index.ntotal} vectors but lacks passage ids "
                f"{sorted(missing)[:5]} of the docstore"
            )
        self.manifest = manifest
        self.spec = spec
        self.next_id = max(manifest.next_id, int(ids.max()) + 1 if len(ids) else 0)
        self.last_seq = manifest.last_seq
        self.origin: Origin | None = None  # set by load
        self._index = index
        self._docs = docs
        self._tombstones = set(ids.tolist()) - set(docs.pids())
        self._excluded: np.ndarray | None = None  # sorted tombstones, made at the next search
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def passages(self) -> Sequence[Passage]:
        """Every passage, in id order."""
        with self._lock:
            return tuple(self._docs.passages_in_id_order())

    @property
    def document_count(self) -> int:
        return self._docs.document_count

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    @property
    def kind(self) -> str:
        return ann.kind_of(self._index)

    def document(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            return self._docs.document(doc_id)

    def documents(self) -> list[StoredDocument]:
        with self._lock:
            return self._docs.documents()

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits per query row, best first; k is capped at the number of passages."""
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(
                f"queries must have shape [n, {self.dim}], got {list(queries.shape)}"
            )
        with self._lock:
            k = min(k, len(self))
            if k == 0:
                return [[] for _ in range(queries.shape[0])]
            if self._excluded is None:  # deletes since the last search (a replay makes many)
                self._excluded = np.array(sorted(self._tombstones), dtype=np.int64)
            # [n, k] each; id -1 marks "no result"; tombstones are excluded inside the search
            scores, ids = ann.search(self._index, queries, k, self.spec, self._excluded)
            passage = self._docs.passage
            return [
                [
                    Hit(p, float(s))
                    for s, i in zip(row_scores, row_ids, strict=True)
                    if i >= 0 and (p := passage(int(i))) is not None
                ]
                for row_scores, row_ids in zip(scores, ids, strict=True)
            ]

    # changes ------------------------------------------------------------------------------

    def apply(self, record: wal.Record) -> None:
        """Apply one update-log record: FAISS and docstore change together, under the lock."""
        if record.seq != self.last_seq + 1:
            raise IndexInvalid(f"update {record.seq} does not follow {self.last_seq}")
        with self._lock:
            if isinstance(record, wal.Upsert):
                self._apply_upsert(record)
            else:
                for doc_id in record.doc_ids:
                    self._drop(doc_id)
            self.last_seq = record.seq

    def _apply_upsert(self, record: wal.Upsert) -> None:
        pids = np.array([pid for d in record.documents for pid in d.pids], dtype=np.int64)
        if record.vectors.shape != (len(pids), self.dim):
            raise InvalidInputError(
                f"vectors must have shape [{len(pids)}, {self.dim}], "
                f"got {list(record.vectors.shape)}"
            )
        if len(pids) and int(pids.min()) < self.next_id:
            raise InvalidInputError(f"passage ids must start at {self.next_id}, got {pids.min()}")
        for document in record.documents:
            self._drop(document.id)
        if len(pids):
            self._index.add_with_ids(np.ascontiguousarray(record.vectors, np.float32), pids)
            self.next_id = int(pids.max()) + 1
        for document in record.documents:
            self._docs.put(document)

    def _drop(self, doc_id: str) -> None:
        pids = self._docs.remove(doc_id)
        if pids:
            self._tombstones.update(pids)
            self._excluded = None

    def drop_tombstones(self, *, at_least: float = REBUILD_FRACTION) -> bool:
        """Take the tombstoned vectors out of FAISS (compaction): flat and IVF in one batched
        removal; HNSW by a rebuild, once the tombstones are `at_least` of the graph."""
        with self._lock:
            if not self._tombstones:
                return False
            drop = np.array(sorted(self._tombstones), dtype=np.int64)
            if ann.supports_remove(self._index):  # one pass over the vectors, under the lock
                self._index.remove_ids(faiss.IDSelectorBatch(drop))
                self._tombstones, self._excluded = set(), None
                return True
            if len(drop) < at_least * self._index.ntotal:
                return False
            next_id = self.next_id
        # outside the lock, so searches go on meanwhile (a graph rebuild is slow); callers keep
        # writers out (LiveIndex.compact holds its writer lock), and if one got in anyway its
        # passages are not in `rebuilt`, which is then thrown away
        rebuilt = ann.rebuild_without(self._index, self.spec, drop)
        with self._lock:
            if self.next_id != next_id:
                logger.warning("passages were added during the rebuild; kept the old index")
                return False
            # deletes that came meanwhile stay tombstones, now of the rebuilt index (a graph
            # cannot remove a node)
            fresh = self._tombstones - set(drop.tolist())
            self._index, self._tombstones, self._excluded = rebuilt, fresh, None
        logger.info("rebuilt the index without %d deleted passages", len(drop))
        return True

    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        vectors: np.ndarray,
        fingerprint: str,
        *,
        spec: AnnSpec | None = None,
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
        chunk_words: int = 100,
    ) -> PassageIndex:
        """An index over `vectors` [n, dim], row i for passages[i], which gets id i;
        `metadata` by document id; `chunk_words` is recorded for later updates."""
        if vectors.ndim != 2 or vectors.shape[0] != len(passages):
            raise InvalidInputError(
                f"vectors must have shape [{len(passages)}, dim], got {list(vectors.shape)}"
            )
        if not np.isfinite(vectors).all():
            row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise InvalidInputError(f"vector of passage {passages[row].id!r} is not finite")
        seen: set[str] = set()
        for passage in passages:
            if passage.id in seen:
                raise InvalidInputError(f"passage id {passage.id!r} occurs twice")
            seen.add(passage.id)
        spec = spec or AnnSpec()
        dim = int(vectors.shape[1])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [n, dim]
        index = ann.new_index(dim, spec, vectors)
        if len(passages):
            index.add_with_ids(vectors, np.arange(len(passages), dtype=np.int64))
        docs = DocStore()
        for document in group_by_document(passages):
            extra = (metadata or {}).get(document.id)
            docs.put(dataclasses.replace(document, metadata=dict(extra)) if extra else document)
        manifest = IndexManifest(
            fingerprint,
            dim,
            len(passages),
            docs.document_count,
            index_type=ann.describe(index),
            ann=dataclasses.asdict(spec),
            next_id=len(passages),
            chunk_words=chunk_words,
        )
        return cls(manifest, index, docs, spec)

    # files --------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write a snapshot to `path` atomically, replacing the index there and its log."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"{path} exists and is not an index folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a server under another uid must read it
        try:
            manifest = self._write_files(tmp)
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest = manifest
        st = os.stat(path)
        self.origin = Origin(st.st_dev, st.st_ino, 0)
        logger.info("saved index of %d passages to %s", len(self), path)

    def _write_files(self, folder: Path) -> IndexManifest:
        with self._lock:  # a consistent copy; the slow writes happen outside the lock
            blobs = {INDEX_FILE: faiss.serialize_index(self._index).tobytes()}
            blobs[PASSAGES_FILE], blobs[DOCUMENTS_FILE] = self._docs.to_jsonl()
            manifest = dataclasses.replace(
                self.manifest,
                passage_count=len(self._docs),
                document_count=self._docs.document_count,
                index_type=ann.describe(self._index),
                ann=dataclasses.asdict(self.spec),
                next_id=self.next_id,
                last_seq=self.last_seq,
            )
        for name, blob in [*blobs.items(), (LOG_FILE, b"")]:
            _write_synced(folder / name, blob)
        checksums = {name: _sha256(blob) for name, blob in blobs.items()}
        manifest = dataclasses.replace(manifest, checksums=checksums)
        _write_synced(
            folder / MANIFEST_FILE, (json.dumps(manifest.to_json(), indent=2) + "\n").encode()
        )
        _fsync(folder)
        return manifest

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        expect_fingerprint: str | None = None,
        search: AnnSpec | None = None,
    ) -> PassageIndex:
        """Read and verify a snapshot and replay its log; with expect_fingerprint, refuse
        another encoder's index; `search` overrides the manifest's search parameters."""
        path = Path(path)
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise IndexNotFound(
                f"no index at {path} (build one with `lorag index build SOURCE... --name NAME`)"
            ) from exc
        try:
            st = os.fstat(dir_fd)
            raw = _read(path, MANIFEST_FILE, dir_fd)
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise IndexInvalid(f"{path / MANIFEST_FILE}: not valid JSON ({exc})") from exc
            manifest = IndexManifest.from_json(data, path / MANIFEST_FILE)
            built_with = manifest.encoder
            if expect_fingerprint is not None and built_with != expect_fingerprint:
                raise IndexInvalid(
                    f"index {path} was built with encoder {built_with!r}, "
                    f"but the server uses encoder {expect_fingerprint!r}; rebuild the index "
                    "with this encoder or configure the one it was built with"
                )
            blobs = {name: _read(path, name, dir_fd) for name in (*DATA_FILES, LOG_FILE)}
        finally:
            os.close(dir_fd)
        for name in DATA_FILES:
            if manifest.checksums.get(name) != _sha256(blobs[name]):
                raise IndexInvalid(
                    f"{path / name}: sha256 differs from {MANIFEST_FILE}; the file is corrupt "
                    "or was changed after the build"
                )
        try:
            index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
            ann.kind_of(index)
        except (RuntimeError, InvalidInputError) as exc:
            raise IndexInvalid(f"{path / INDEX_FILE}: not a FAISS index ({exc})") from exc
        docs = DocStore.from_jsonl(
            blobs[PASSAGES_FILE], blobs[DOCUMENTS_FILE], path / PASSAGES_FILE, path / DOCUMENTS_FILE
        )
        if len(docs) != manifest.passage_count:
            raise IndexInvalid(
                f"{path / PASSAGES_FILE}: {len(docs)} passages, "
                f"{MANIFEST_FILE} says {manifest.passage_count}"
            )
        spec = manifest.spec(path / MANIFEST_FILE)
        if search is not None:
            spec = dataclasses.replace(spec, ef_search=search.ef_search, nprobe=search.nprobe)
        try:
            loaded = cls(manifest, index, docs, spec)
        except IndexInvalid as exc:
            raise IndexInvalid(f"{path / INDEX_FILE}: {exc}") from exc
        tail = wal.parse(
            blobs[LOG_FILE], path / LOG_FILE, dim=manifest.dim, after_seq=manifest.last_seq
        )
        for record in tail.records:
            loaded.apply(record)
        loaded.origin = Origin(st.st_dev, st.st_ino, tail.end)
        logger.info(
            "loaded index %s: %d passages, %s, %d updates replayed",
            path,
            len(loaded),
            manifest.index_type,
            len(tail.records),
        )
        return loaded


def _faiss_ids(index: faiss.Index) -> np.ndarray:
    # flat and HNSW keep ids in an IndexIDMap2; IVF kinds store them in their inverted lists
    # (an IDMap over IVF would scramble ids after remove_ids: app/retrieval/ann.py)
    try:
        return ann.ids_of(index)  # [ntotal]
    except (AttributeError, RuntimeError) as exc:
        raise IndexInvalid(f"a FAISS index without passage ids ({exc})") from exc


def _write_synced(path: Path, blob: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())


def _read(path: Path, name: str, dir_fd: int) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise IndexInvalid(f"{path / name}: missing") from exc
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target`; an existing `target` is replaced and deleted."""
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old index
    else:
        # no atomic exchange here: for an instant `target` is absent (readers get IndexNotFound)
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
    _fsync(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
