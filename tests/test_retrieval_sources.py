"""read_sources: .jsonl, .txt, .md and folders; every error names file:line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.errors import InvalidInputError
from app.retrieval.sources import Document, SourceError, read_sources


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_documents_keep_extra_keys_as_metadata(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            json.dumps({"id": "x", "title": "X", "text": "about x", "url": "http://x"}),
            "",  # blank lines are skipped
            json.dumps({"id": "y", "text": "no title"}),
        ],
    )
    docs = list(read_sources([path]))
    assert docs == [
        Document("x", "X", "about x", {"url": "http://x"}),
        Document("y", "", "no title", {}),
    ]
    assert [d.source for d in docs] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"title": "t", "text": "x"}), "missing key 'id'"),
        (json.dumps({"id": "a"}), "missing key 'text'"),
        (json.dumps({"id": 7, "text": "x"}), "'id' must be a string"),
        (json.dumps({"id": " ", "text": "x"}), "'id' is empty"),
    ],
)
def test_bad_jsonl_line_is_named_by_file_and_line(
    tmp_path: Path, bad_line: str, reason: str
) -> None:
    good = json.dumps({"id": "ok", "text": "fine"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(SourceError) as err:
        list(read_sources([path]))
    assert f"{path}:3: " in str(err.value) and reason in str(err.value)
    assert err.value.line == 3 and isinstance(err.value, InvalidInputError)


def test_non_utf8_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match=re.escape(f"{path}:2: not UTF-8")):
        list(read_sources([path]))


def test_markdown_title_is_its_first_heading_and_text_is_the_rest(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("\n# Glaciers\n\nIce that flows.\n", encoding="utf-8")
    (tmp_path / "plain.txt").write_text("# not a heading in txt\nbody\n", encoding="utf-8")
    docs = {d.id: d for d in read_sources([tmp_path])}
    assert docs["notes.md"].title == "Glaciers"
    assert docs["notes.md"].text.strip() == "Ice that flows."
    assert docs["plain.txt"].title == "plain"
    assert docs["plain.txt"].text.startswith("# not a heading")


def test_folders_are_read_recursively_in_order_skipping_hidden_and_other_files(
    tmp_path: Path,
) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("two", encoding="utf-8")
    (tmp_path / "a.md").write_text("one", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "three", "text": "3"}) + "\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    assert [d.id for d in read_sources([tmp_path])] == ["a.md", "b/two.txt", "three"]


def test_single_text_file_id_is_its_name(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "doc.txt"
    path.write_text("hello", encoding="utf-8")
    assert [d.id for d in read_sources([path])] == ["doc.txt"]


def test_missing_and_unsupported_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        list(read_sources([tmp_path / "nope.jsonl"]))
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n")
    with pytest.raises(SourceError, match=re.escape(f"{csv}: unsupported file type")):
        list(read_sources([csv]))


def test_non_utf8_text_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(b"line one\nline two\nbad \xff here\n")
    with pytest.raises(SourceError, match=re.escape(f"{path}:3: not UTF-8")):
        list(read_sources([path]))
