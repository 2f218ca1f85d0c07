"""The index folder's format: its files, and the manifest that describes and checksums them.

    <index>/manifest.json    format version, encoder fingerprint, dim, counts, index kind and
                             search parameters, next passage id, last log seq, checksums
    <index>/index.faiss      faiss.write_index output, passage ids inside (app/retrieval/ann.py)
    <index>/passages.jsonl   the docstore (app/retrieval/docstore.py) ...
    <index>/documents.jsonl  ... passages by id, documents with their passage ids and metadata
    <index>/updates.log      changes acknowledged since this snapshot (app/retrieval/wal.py)

The first four files are a snapshot, checksummed in the manifest; the log grows after it.
Format 2 (ids, documents, the log) replaced format 1 (FAISS row = passages.jsonl line); a
format-1 folder is refused with IndexOutdated, which `lorag prepare` answers for the demo index
by rebuilding it, and any other index needs `lorag index build` again.

This module only turns a manifest into bytes and back and checks it; reading and writing the
folder is PassageIndex's (app/retrieval/store.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.errors import IndexInvalid, InvalidInputError
from app.retrieval import wal
from app.retrieval.ann import AnnSpec

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.jsonl"
DOCUMENTS_FILE = "documents.jsonl"
LOG_FILE = wal.LOG_FILE
DATA_FILES = (INDEX_FILE, PASSAGES_FILE, DOCUMENTS_FILE)  # checksummed in the manifest


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

    def encode(self) -> bytes:
        """The contents of manifest.json."""
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()

    @classmethod
    def parse(cls, raw: bytes, source: Path) -> IndexManifest:
        """Read the contents of manifest.json `source`."""
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexInvalid(f"{source}: not valid JSON ({exc})") from exc
        return cls.from_json(data, source)

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

    def check_encoder(self, expected: str | None, folder: Path) -> None:
        """Refuse an index built with another encoder than `expected` (None: any)."""
        if expected is not None and self.encoder != expected:
            raise IndexInvalid(
                f"index {folder} was built with encoder {self.encoder!r}, "
                f"but the server uses encoder {expected!r}; rebuild the index "
                "with this encoder or configure the one it was built with"
            )

    def with_checksums(self, blobs: Mapping[str, bytes]) -> IndexManifest:
        """This manifest with the checksums of `blobs` (file name -> contents)."""
        return dataclasses.replace(self, checksums={n: sha256(b) for n, b in blobs.items()})

    def verify(self, blobs: Mapping[str, bytes], folder: Path) -> None:
        """Check each data file's contents against its checksum."""
        for name in DATA_FILES:
            if self.checksums.get(name) != sha256(blobs[name]):
                raise IndexInvalid(
                    f"{folder / name}: sha256 differs from {MANIFEST_FILE}; the file is corrupt "
                    "or was changed after the build"
                )


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
