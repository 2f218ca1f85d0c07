"""The update log: acknowledged document adds and deletes since the last snapshot.

One record per line, a checksum in front of its JSON payload:

    1c2a9f03 {"seq": 8, "op": "upsert", "documents": [...], "vectors": "<base64 float32>"}
    77e0b4d1 {"seq": 9, "op": "delete", "doc_ids": ["a", "b"]}

`seq` counts up by one from the snapshot's `last_seq`; the checksum is the CRC-32 of the payload
bytes. A record is acknowledged (the HTTP 200, the CLI's exit 0) only after `fsync` returns, so
after a crash the log holds every acknowledged change. The last line may be torn (a crash
mid-append, never acknowledged): it is recognised by its missing newline or wrong checksum and
dropped with a warning, and a writer cuts it off before appending. A bad line anywhere else is
corruption, reported with the file and line, because dropping it would silently lose an
acknowledged change.

The passage vectors travel in the log (base64 of little-endian float32, [m, dim] row-major)
instead of being computed again at replay. This costs disk (about 2 KB per 384-d passage beside
its ~0.7 KB of text, and only until the next compaction folds it into the snapshot), and buys a
start that needs no encoder pass (replaying 10k passages takes milliseconds, re-embedding them
a minute on 2 cores), and exactness: the replayed vectors are the acknowledged ones bit for bit,
even if the encoder now runs on another device or library version whose floats differ.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.contracts import Passage
from app.errors import IndexInvalid
from app.retrieval.docstore import StoredDocument

logger = logging.getLogger(__name__)

LOG_FILE = "updates.log"


@dataclass(frozen=True)
class Upsert:
    """Add or replace whole documents; vectors [sum of passages, dim] in document order."""

    seq: int
    documents: tuple[StoredDocument, ...]
    vectors: np.ndarray


@dataclass(frozen=True)
class Delete:
    seq: int
    doc_ids: tuple[str, ...]


Record = Upsert | Delete


@dataclass(frozen=True)
class LogTail:
    records: list[Record]
    end: int  # byte offset just past the last good record
    torn: bool  # a torn last record was dropped


def encode(record: Record) -> bytes:
    """One log line, newline included."""
    payload: dict[str, Any]
    if isinstance(record, Upsert):
        vectors = np.ascontiguousarray(record.vectors, dtype="<f4")  # [m, dim]
        payload = {
            "seq": record.seq,
            "op": "upsert",
            "documents": [
                {
                    "id": d.id,
                    "title": d.title,
                    "metadata": dict(d.metadata),
                    "passages": [
                        [pid, p.id, p.text] for pid, p in zip(d.pids, d.passages, strict=True)
                    ],
                }
                for d in record.documents
            ],
            "dim": int(vectors.shape[1]),
            "vectors": base64.b64encode(vectors.tobytes()).decode("ascii"),
        }
    else:
        payload = {"seq": record.seq, "op": "delete", "doc_ids": list(record.doc_ids)}
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode(body: bytes, dim: int) -> Record:
    data = json.loads(body)
    if data["op"] == "delete":
        return Delete(int(data["seq"]), tuple(str(d) for d in data["doc_ids"]))
    if data["op"] != "upsert":
        raise ValueError(f"unknown op {data['op']!r}")
    if data["dim"] != dim:
        raise ValueError(f"vectors are {data['dim']}-d, the index is {dim}-d")
    documents = tuple(_document(d) for d in data["documents"])
    rows = sum(len(d.pids) for d in documents)
    raw = base64.b64decode(data["vectors"], validate=True)
    vectors = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(rows, dim)
    return Upsert(int(data["seq"]), documents, vectors)


def _document(data: Mapping[str, Any]) -> StoredDocument:
    doc_id, title = str(data["id"]), str(data["title"])
    rows = data["passages"]
    return StoredDocument(
        id=doc_id,
        title=title,
        passages=tuple(
            Passage(str(pid_text[1]), doc_id, title, str(pid_text[2])) for pid_text in rows
        ),
        pids=tuple(int(row[0]) for row in rows),
        metadata=dict(data.get("metadata") or {}),
    )


def read(path: Path, *, dim: int, after_seq: int) -> LogTail:
    """Every record of the log at `path`; a missing file is an error (a snapshot always has its
    log, empty or not)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError as exc:
        raise IndexInvalid(f"{path}: missing") from exc
    return parse(blob, path, dim=dim, after_seq=after_seq)


def parse(blob: bytes, path: Path, *, dim: int, after_seq: int) -> LogTail:
    """The records in `blob` (the log at `path`); the first must have seq after_seq + 1."""
    lines = blob.split(b"\n")  # the last item is b"" when the log ends with a newline
    records: list[Record] = []
    end = 0
    for i, line in enumerate(lines[:-1]):
        problem = _check(line)
        record: Record | None = None
        if problem is None:
            try:
                record = _decode(line[9:], dim)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                problem = f"bad record ({exc})"
        expected = after_seq + len(records) + 1
        if record is not None and record.seq != expected:
            problem = f"sequence number {record.seq}, expected {expected}"
        if problem is not None:
            last = i == len(lines) - 2 and not lines[-1]
            if last and problem.startswith("checksum"):
                return _torn(path, records, end, i + 1, problem)
            raise IndexInvalid(
                f"{path}:{i + 1}: {problem}; the log is corrupt (acknowledged changes after it "
                "would be lost: restore the file or rebuild the index)"
            )
        assert record is not None
        records.append(record)
        end += len(line) + 1
    if lines[-1]:  # bytes after the last newline: an append that never finished
        return _torn(path, records, end, len(lines), "no newline at the end")
    return LogTail(records, end, torn=False)


def _check(line: bytes) -> str | None:
    if len(line) < 10 or line[8:9] != b" ":
        return "checksum missing"
    try:
        expected = int(line[:8], 16)
    except ValueError:
        return "checksum missing"
    if zlib.crc32(line[9:]) != expected:
        return "checksum mismatch"
    return None


def _torn(path: Path, records: list[Record], end: int, line_no: int, why: str) -> LogTail:
    logger.warning(
        "%s:%d: dropping a torn last record (%s): a crash during an append that was never "
        "acknowledged",
        path,
        line_no,
        why,
    )
    return LogTail(records, end, torn=True)


class LogWriter:
    """Appends records to one log file, each fsynced before `append` returns."""

    def __init__(self, path: Path, end: int) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY)
        size = os.fstat(self._fd).st_size
        if size > end:  # a torn record a crash left: cut it off, or the next append follows it
            logger.warning("%s: truncating %d bytes of torn record", path, size - end)
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        elif size < end:
            os.close(self._fd)
            raise IndexInvalid(f"{path}: {size} bytes, but {end} were read from it before")
        self.end = end

    def append(self, record: Record) -> None:
        line = encode(record)
        try:
            os.lseek(self._fd, self.end, os.SEEK_SET)
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except BaseException:
            # not acknowledged: take it back, so the next record does not follow half of it
            os.ftruncate(self._fd, self.end)
            raise
        self.end += len(line)

    def close(self) -> None:
        os.close(self._fd)
