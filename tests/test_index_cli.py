"""`lorag index add | delete | compact` on a folder, and beside a running server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli import main
from app.main import create_app
from app.retrieval.manifest import LOG_FILE
from app.retrieval.store import PassageIndex
from tests.conftest import make_settings, wait_loaded

DOCS = [
    {
        "id": "kelp",
        "title": "Kelp",
        "text": "Giant kelp grows up to half a metre a day in cold seas.",
    },
    {"id": "opal", "title": "Opal", "text": "Opal holds water inside its silica spheres."},
]


def texts(folder: Path) -> dict[str, str]:
    index = PassageIndex.load(folder)
    return {d.id: " ".join(p.text for p in d.passages) for d in index.documents()}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAG_INDEX_DIR", str(tmp_path / "index"))
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return source


def test_add_creates_then_replaces_delete_and_compact(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "index" / "notes"
    assert main(["index", "add", str(env), "--name", "notes", "--words", "50"]) == 0
    assert "added 2, replaced 0 documents" in capsys.readouterr().out
    assert texts(folder) == {d["id"]: d["text"] for d in DOCS}
    assert PassageIndex.load(folder).manifest.chunk_words == 50
    assert (folder / LOG_FILE).stat().st_size > 0  # durable in the log, not yet compacted

    changed = tmp_path / "kelp.md"
    changed.write_text("# Kelp\n\nKelp forests shelter sea otters.")
    assert main(["index", "add", str(changed), "--name", "notes"]) == 0
    assert "added 1, replaced 0" in capsys.readouterr().out  # a .md file's id is its name

    assert main(["index", "delete", "kelp", "kelp.md", "--name", "notes"]) == 0
    assert texts(folder) == {"opal": DOCS[1]["text"]}
    assert main(["index", "compact", "--name", "notes"]) == 0
    assert "folded 3 updates" in capsys.readouterr().out
    assert (folder / LOG_FILE).stat().st_size == 0
    assert texts(folder) == {"opal": DOCS[1]["text"]}


def test_delete_of_an_unknown_document_names_it_and_deletes_nothing(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "add", str(env), "--name", "notes"]) == 0
    assert main(["index", "delete", "opal", "nope", "--name", "notes"]) == 2
    assert "document 'nope' is not in index 'notes'" in capsys.readouterr().err
    assert set(texts(tmp_path / "index" / "notes")) == {"kelp", "opal"}
    assert main(["index", "compact", "--name", "absent"]) == 2
    assert "no index 'absent'" in capsys.readouterr().err


def test_a_running_server_sees_the_cli_changes_at_its_next_request(
    env: Path,
    tmp_path: Path,
    index_root: Path,
    tiny_generators: dict[str, Path],
    adapters_root: Path,
) -> None:
    root = tmp_path / "index"
    shutil.copytree(index_root / "facts", root / "facts")
    settings = make_settings(tiny_generators["t5"], root, adapters_root)
    with TestClient(create_app(settings)) as client:
        wait_loaded(client)
        assert main(["index", "add", str(env), "--name", "facts"]) == 0
        body = {"question": "How fast does giant kelp grow?", "top_k": 1}
        assert client.post("/ask", json=body).json()["passages"][0]["doc_id"] == "kelp"
        assert main(["index", "delete", "kelp", "--name", "facts"]) == 0
        assert client.post("/ask", json=body).json()["passages"][0]["doc_id"] != "kelp"
        # and the server's own change after the CLI's keeps both
        doc = {"id": "tide", "text": "Tides follow the moon."}
        assert client.post("/documents", json={"documents": [doc]}).status_code == 200
    assert {"opal", "tide"} <= set(texts(root / "facts")) and "kelp" not in texts(root / "facts")
