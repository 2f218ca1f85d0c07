"""Read source documents from .jsonl, .txt and .md files and from folders of them.

A .jsonl line is one document: {"id": str, "title": str, "text": str, ...}; other keys (a url,
say) are kept as metadata. A .txt or .md file is one document whose id is its path relative to
the folder given (or its file name when the file is given itself); its title is its first
Markdown heading, or else the file name without suffix. Folders are read recursively in sorted
order, skipping hidden entries and files of other types. Every error names file:line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import InvalidInputError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (".jsonl", *TEXT_SUFFIXES)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")


class SourceError(InvalidInputError):
    """A source path that is missing, unreadable or malformed; the message names file:line."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    title: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = field(default="", compare=False)  # "file" or "file:line", for error messages


def read_sources(paths: Sequence[Path]) -> Iterator[Document]:
    """Documents from each path in turn: a .jsonl/.txt/.md file, or a folder of them."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from _read_folder(path)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise SourceError(path, f"unsupported file type; use one of {', '.join(SUFFIXES)}")
            yield from _read_file(path, root=path.parent)
        else:
            raise SourceError(path, "no such file or folder")


def _read_folder(root: Path) -> Iterator[Document]:
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            yield from _read_file(path, root=root)
        elif path.is_file():
            logger.debug("skipping %s: not one of %s", path, SUFFIXES)


def _read_file(path: Path, *, root: Path) -> Iterator[Document]:
    if path.suffix.lower() == ".jsonl":
        yield from _read_jsonl(path)
    else:
        document = _read_text(path, root=root)
        if document is not None:
            yield document


def _read_jsonl(path: Path) -> Iterator[Document]:
    try:
        handle = path.open("rb")  # bytes, so a decoding error names its exact line
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror}") from exc
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(path, f"not UTF-8 text ({exc.reason})", line_no) from exc
            if line.strip():
                yield _parse_jsonl_line(path, line_no, line)


def _parse_jsonl_line(path: Path, line_no: int, line: str) -> Document:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SourceError(path, f"invalid JSON: {exc.msg} at column {exc.colno}", line_no) from exc
    if not isinstance(record, dict):
        raise SourceError(path, f"expected a JSON object, got {type(record).__name__}", line_no)
    for key in ("id", "text"):
        if key not in record:
            raise SourceError(path, f"missing key {key!r}", line_no)
    for key in ("id", "title", "text"):
        if key in record and not isinstance(record[key], str):
            found = type(record[key]).__name__
            raise SourceError(path, f"{key!r} must be a string, got {found}", line_no)
    if not record["id"].strip():
        raise SourceError(path, "'id' is empty", line_no)
    metadata = {k: str(v) for k, v in record.items() if k not in ("id", "title", "text")}
    title = record.get("title", "")
    return Document(record["id"], title, record["text"], metadata, source=f"{path}:{line_no}")


def _read_text(path: Path, *, root: Path) -> Document | None:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SourceError(path, f"not UTF-8 text ({exc.reason})", line) from exc
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror}") from exc
    if not content.strip():
        logger.warning("skipping %s: empty", path)
        return None
    title, text = path.stem, content
    lines = content.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), 0)
    heading = _HEADING.match(lines[first]) if path.suffix.lower() == ".md" else None
    if heading:
        title = heading.group(1)
        text = "\n".join(lines[first + 1 :])
    doc_id = path.relative_to(root).as_posix()
    return Document(doc_id, title, text, source=str(path))
