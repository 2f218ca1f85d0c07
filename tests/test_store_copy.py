"""`lorag index copy` and the CLI on LORAG_STORE=postgres: a FAISS folder copied into the real
PostgreSQL searches as the folder does (the same passages, scores within 1e-5), with its vectors
as they were (nothing embedded again); add and delete then go through the same store."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.errors import IndexNotFound, InvalidInputError
from app.retrieval.ann import AnnSpec
from app.retrieval.chunking import chunk_document
from app.retrieval.index_copy import prepared_from
from app.retrieval.store import PassageIndex
from app.settings import Settings
from app.wiring import opened_store
from tests.hash_encoder import HashEncoder


@pytest.fixture
def pg_env(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("LORAG_STORE", "postgres")
    monkeypatch.setenv("LORAG_DATABASE_URL", pg_url)
    monkeypatch.setenv("LORAG_INDEX_DIR", str(tmp_path / "no-folders-here"))
    return Settings()


def test_a_copied_index_searches_as_its_folder(
    pg_env: Settings, index_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = PassageIndex.load(index_root / "facts")
    assert main(["index", "copy", str(index_root / "facts")]) == 0
    assert "into postgres index 'facts'" in capsys.readouterr().out
    assert not (tmp_path / "no-folders-here").exists()  # nothing went to the FAISS store

    ids = [pid for doc in folder.documents() for pid in doc.pids]
    queries = folder.vectors(ids)  # [n, dim]: each passage's own vector finds it first
    with opened_store(pg_env, folder.manifest.encoder) as store:
        copy = store.get("facts")
        assert copy.count() == (len(folder), folder.document_count)
        got, want = copy.search(queries, 3), folder.search(queries, 3)
        for g, w in zip(got, want, strict=True):
            assert [h.passage for h in g] == [h.passage for h in w]
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
        for doc in folder.documents():  # passage ids are the store's own; the rest is equal
            stored = copy.document(doc.id)
            assert stored is not None
            assert (stored.title, stored.passages, stored.metadata) == (
                doc.title,
                doc.passages,
                doc.metadata,
            )

    # the CLI's add and delete reach the same collection in the database
    source = tmp_path / "new.jsonl"
    source.write_text(json.dumps({"id": "new", "title": "New", "text": "Fresh words."}) + "\n")
    assert main(["index", "add", str(source), "--name", "facts"]) == 0
    assert "added 1, replaced 0" in capsys.readouterr().out
    assert main(["index", "delete", "new", "--name", "facts"]) == 0
    with opened_store(pg_env, folder.manifest.encoder) as store:
        assert store.get("facts").document("new") is None
        assert store.get("facts").count() == (len(folder), folder.document_count)
    assert main(["index", "compact", "--name", "facts"]) == 0  # no log to fold in Postgres
    assert "nothing to compact" in capsys.readouterr().out


def test_an_ivf_index_cannot_give_its_vectors() -> None:
    enc = HashEncoder()
    passages = [p for i in range(64) for p in chunk_document(f"d{i}", f"d{i}", f"word{i} text")]
    index = PassageIndex.build(
        passages,
        enc.encode_passages(passages),
        enc.fingerprint,
        spec=AnnSpec(kind="ivf_sq", nlist=2),
    )
    with pytest.raises(InvalidInputError, match="ivf_sq index keeps no vector per passage id"):
        prepared_from(index, index.documents()[:1])


def test_build_into_postgres_then_prepare_the_demo_there_once(
    pg_env: Settings,
    tmp_path: Path,
    tiny_generators: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import app.wiring as wiring
    from app.retrieval.builder import build_passage_index
    from app.retrieval.encoders import load_encoder

    docs = [
        {"id": "kelp", "title": "Kelp", "text": "Giant kelp grows half a metre a day."},
        {"id": "opal", "title": "Opal", "text": "Opal holds water inside silica spheres."},
    ]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    build = ["index", "build", str(source), "--name", "notes", "--store", "postgres"]
    assert main([*build, "--words", "5"]) == 0
    assert "built postgres index 'notes': 2 documents" in capsys.readouterr().out
    encoder = load_encoder("default", "sentence-transformers")
    reference = build_passage_index([source], encoder, words=5, show_progress=False)
    queries = encoder.encode_questions(["How fast does kelp grow?", "What is inside opal?"])
    with opened_store(pg_env, encoder.fingerprint) as store:
        notes = store.get("notes")
        assert notes.describe().chunk_words == 5 and notes.count() == (len(reference), 2)
        got, want = notes.search(queries, 2), reference.search(queries, 2)
        assert [[h.passage for h in row] for row in got] == [
            [h.passage for h in row] for row in want
        ]
    assert main(build) == 2  # a build replaces; into a filled collection it is refused
    assert "'notes' already holds 2 documents" in capsys.readouterr().err

    demo = pg_env.model_copy(update={"index_name": "demo", "generator": str(tiny_generators["t5"])})
    wiring.prepare(demo, demo_source=source)
    with opened_store(demo, encoder.fingerprint) as store:
        assert store.get("demo").count() == (len(build_passage_index([source], encoder)), 2)

    def no_second_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo index was built again")

    monkeypatch.setattr(wiring, "build_passage_index", no_second_build)
    wiring.prepare(demo, demo_source=source)  # there already: nothing to do
    with pytest.raises(IndexNotFound, match="no index 'other' in the database"):
        wiring.prepare(demo.model_copy(update={"index_name": "other"}), demo_source=source)


def test_replicas_preparing_the_demo_at_once_build_it_once_and_nobody_sees_it_part_filled(
    pg_env: Settings,
    pg_url: str,
    tmp_path: Path,
    tiny_generators: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg

    import app.wiring as wiring
    from app.retrieval import index_copy
    from app.retrieval.builder import build_passage_index

    source = tmp_path / "demo.jsonl"
    words = " ".join(f"w{j}" for j in range(150))  # two passages a document
    source.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "title": f"D{i}", "text": f"{i} {words}"}) + "\n"
            for i in range(16)
        )
    )
    builds: list[int] = []

    def counted(*args: object, **kwargs: object) -> PassageIndex:
        builds.append(1)
        return build_passage_index(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(wiring, "build_passage_index", counted)
    monkeypatch.setattr(index_copy, "BATCH", 3)  # a fill in batches would show part filled
    demo = pg_env.model_copy(update={"index_name": "demo", "generator": str(tiny_generators["t5"])})
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # a reader, as a replica serving the collection would be
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while not done.is_set():
                try:
                    row = conn.execute(
                        "SELECT count(*) FROM lorag_documents d JOIN lorag_collections c "
                        "ON c.id = d.collection_id WHERE c.name = 'demo'"
                    ).fetchone()
                except psycopg.errors.UndefinedTable:  # the store's migrations not applied yet
                    row = (0,)
                seen.add(row[0] if row else 0)
                time.sleep(0.002)

    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def replica() -> None:
        start.wait()
        try:
            wiring.prepare(demo, demo_source=source)
        except BaseException as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        replicas = [threading.Thread(target=replica) for _ in range(2)]
        for t in replicas:
            t.start()
        for t in replicas:
            t.join()
    finally:
        done.set()
        watcher.join()
    assert not errors, errors
    assert builds == [1]  # the second replica waited on the lock, then found it built
    with opened_store(demo, demo.encoder_spec.load().fingerprint) as store:
        assert store.get("demo").count() == (32, 16)  # every document, each one whole
    assert seen <= {0, 16} and 16 in seen  # empty, then whole: never part filled
