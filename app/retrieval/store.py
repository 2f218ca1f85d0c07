"""The passage index: a FAISS inner-product index plus its docstore, kept in one folder.

    <index>/manifest.json   format version, encoder fingerprint, dim, count, type, checksums
    <index>/index.faiss     faiss.write_index output (FAISS's own format; never pickle)
    <index>/passages.jsonl  the docstore: line i is the passage whose FAISS id is i

The index is exact (a flat inner-product index, "Flat" in FAISS's factory names): on the demo
corpus and up to a few hundred thousand passages a brute-force scan costs milliseconds, and
the manifest records the type so approximate indexes can be added later.

Saving is atomic: the files are written and fsynced in a temporary folder beside the target,
which is then renamed into place (on Linux an existing index is swapped out in one step with
renameat2(RENAME_EXCHANGE)), so a reader sees the old index or the new one, never a mix.
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
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.errors import IndexInvalid, IndexNotFound, InvalidInputError
from app.retrieval.types import Hit, Passage

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.jsonl"
DATA_FILES = (INDEX_FILE, PASSAGES_FILE)  # checksummed in the manifest
FLAT = "Flat"  # the FAISS factory name of the exact index


@dataclass(frozen=True)
class IndexManifest:
    encoder: str  # the encoder fingerprint (TextEncoder.fingerprint) the vectors came from
    dim: int
    passage_count: int
    index_type: str = FLAT
    metric: str = "inner_product"
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    checksums: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["checksums"] = dict(self.checksums)
        return data

    @classmethod
    def from_json(cls, data: object, source: Path) -> IndexManifest:
        if not isinstance(data, dict):
            raise IndexInvalid(f"{source}: expected a JSON object")
        version = data.get("format_version")
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
        if not isinstance(manifest.dim, int) or not isinstance(manifest.passage_count, int):
            raise IndexInvalid(f"{source}: 'dim' and 'passage_count' must be integers")
        return manifest


class PassageIndex:
    """Passages and their vectors; search returns the top-k passages by inner product."""

    def __init__(self, manifest: IndexManifest, index: faiss.Index, passages: list[Passage]):
        if index.ntotal != len(passages) or index.d != manifest.dim:
            raise IndexInvalid(
                f"FAISS index holds {index.ntotal} {index.d}-d vectors, but there are "
                f"{len(passages)} passages and the manifest says {manifest.dim}-d"
            )
        self.manifest = manifest
        self._index = index
        self._passages = passages

    def __len__(self) -> int:
        return len(self._passages)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def passages(self) -> Sequence[Passage]:
        return tuple(self._passages)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits per query row, best first; k is capped at the number of passages."""
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(
                f"queries must have shape [n, {self.dim}], got {list(queries.shape)}"
            )
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(queries.shape[0])]
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # [n, dim]
        scores, ids = self._index.search(queries, k)  # [n, k] each; id -1 marks "no result"
        return [
            [
                Hit(self._passages[int(i)], float(s))
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    @classmethod
    def build(
        cls, passages: Sequence[Passage], vectors: np.ndarray, fingerprint: str
    ) -> PassageIndex:
        """An exact inner-product index over `vectors` [n, dim], row i for passages[i]."""
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
        dim = int(vectors.shape[1])
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        manifest = IndexManifest(fingerprint, dim, len(passages))
        return cls(manifest, index, list(passages))

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically, replacing an index already there."""
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
        logger.info("saved index of %d passages to %s", len(self), path)

    def _write_files(self, folder: Path) -> IndexManifest:
        faiss.write_index(self._index, str(folder / INDEX_FILE))
        _fsync(folder / INDEX_FILE)
        with (folder / PASSAGES_FILE).open("w", encoding="utf-8") as handle:
            for p in self._passages:
                record = {"id": p.id, "doc_id": p.doc_id, "title": p.title, "text": p.text}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        _fsync(folder / PASSAGES_FILE)
        checksums = {name: _sha256((folder / name).read_bytes()) for name in DATA_FILES}
        manifest = dataclasses.replace(self.manifest, checksums=checksums)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        _fsync(folder / MANIFEST_FILE)
        _fsync(folder)
        return manifest

    @classmethod
    def load(cls, path: Path, *, expect_fingerprint: str | None = None) -> PassageIndex:
        """Read and verify an index folder; with expect_fingerprint, refuse another encoder's."""
        path = Path(path)
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise IndexNotFound(
                f"no index at {path} (build one with `lorag index build SOURCE... --name NAME`)"
            ) from exc
        try:
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
            blobs = {name: _read(path, name, dir_fd) for name in DATA_FILES}
        finally:
            os.close(dir_fd)
        for name, blob in blobs.items():
            if manifest.checksums.get(name) != _sha256(blob):
                raise IndexInvalid(
                    f"{path / name}: sha256 differs from {MANIFEST_FILE}; the file is corrupt "
                    "or was changed after the build"
                )
        try:
            index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexInvalid(f"{path / INDEX_FILE}: not a FAISS index ({exc})") from exc
        passages = _parse_passages(blobs[PASSAGES_FILE], path / PASSAGES_FILE)
        if len(passages) != manifest.passage_count:
            raise IndexInvalid(
                f"{path / PASSAGES_FILE}: {len(passages)} passages, "
                f"{MANIFEST_FILE} says {manifest.passage_count}"
            )
        try:
            loaded = cls(manifest, index, passages)
        except IndexInvalid as exc:
            raise IndexInvalid(f"{path / INDEX_FILE}: {exc}") from exc
        logger.info("loaded index %s: %d passages, %s", path, len(loaded), manifest.index_type)
        return loaded


def _parse_passages(blob: bytes, source: Path) -> list[Passage]:
    passages = []
    for line_no, line in enumerate(blob.splitlines(), start=1):
        try:
            record = json.loads(line)
            passage = Passage(record["id"], record["doc_id"], record["title"], record["text"])
            passages.append(passage)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise IndexInvalid(f"{source}:{line_no}: not a passage record ({exc})") from exc
    return passages


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
