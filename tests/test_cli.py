"""The CLI: build an index from files, then answer from it in process, no server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.cli import main


def test_index_build_then_ask_in_process(tmp_path: Path, tiny_generators, monkeypatch, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tarn.md").write_text(
        "# Tarn of Velm\n\nThe Tarn of Velm is a lake with glowing eels.\n"
    )
    (docs / "piano.txt").write_text("A piano makes sound when felt hammers strike steel strings.")
    monkeypatch.setenv("LORAG_INDEX_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("LORAG_GENERATOR", str(tiny_generators["t5"]))
    monkeypatch.setenv("LORAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAG_ADAPTERS_DIR", str(tmp_path))

    assert main(["index", "build", str(docs), "--name", "mine"]) == 0
    assert "built" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "index" / "mine" / "manifest.json").read_text())
    assert manifest["passage_count"] == 2

    def no_app(*args: object, **kwargs: object) -> None:
        raise AssertionError("lorag ask built the ASGI app")

    # in process means the service itself (app/wiring.py), not the HTTP app driven in process
    monkeypatch.setattr("app.main.create_app", no_app)
    assert (
        main(["ask", "Which lake has glowing eels?", "--index-name", "mine", "--top-k", "1"]) == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["passages"][0]["title"] == "Tarn of Velm"
    assert answer["mode"] == "concat" and answer["generated_tokens"] >= 1
    assert sum(p["weight"] for p in answer["passages"]) == pytest.approx(1.0)


def test_index_build_names_the_bad_line(tmp_path: Path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "A", "text": "fine"}\n{"id": "b", "title": \n')
    monkeypatch.setenv("LORAG_INDEX_DIR", str(tmp_path / "index"))
    assert main(["index", "build", str(bad), "--name", "x"]) == 2
    assert re.search(r"bad\.jsonl:2", capsys.readouterr().err)
    assert not (tmp_path / "index" / "x").exists()
