"""IndexCatalog and the Retriever over it: named indexes, lazy loads, atomic switches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import app.retrieval.indexes as indexes
from app.errors import IndexInvalid, IndexNotFound, InvalidInputError
from app.retrieval.chunking import chunk_document
from app.retrieval.indexes import IndexCatalog
from app.retrieval.memory_store import MemoryStore
from app.retrieval.retriever import Retriever
from app.retrieval.store import PassageIndex
from tests.hash_encoder import HashEncoder

ENC = HashEncoder()


def build(root: Path, name: str, docs: dict[str, str], fingerprint: str = ENC.fingerprint) -> None:
    passages = [p for d, t in docs.items() for p in chunk_document(d, d, t)]
    PassageIndex.build(passages, ENC.encode_passages(passages), fingerprint).save(root / name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    build(tmp_path, "a", {"capital": "The capital of Veldoria is Marnsk."})
    build(tmp_path, "b", {"capital": "The capital of Veldoria is Tolvar."})
    (tmp_path / "sources").mkdir()  # not an index: no manifest
    (tmp_path / ".a.lock").write_text("")
    (tmp_path / ".b.tmp-123").mkdir()
    return tmp_path


def test_names_are_the_index_folders_only(root: Path) -> None:
    catalog = IndexCatalog(root, "a", fingerprint=ENC.fingerprint)
    assert catalog.names() == ["a", "b"]
    infos = {i.name: i for i in catalog.list()}
    assert infos["a"].active and not infos["a"].loaded and infos["a"].passages is None
    catalog.get("b")
    infos = {i.name: i for i in catalog.list()}
    assert infos["b"].loaded and (infos["b"].passages, infos["b"].documents) == (1, 1)


def test_concurrent_first_uses_load_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = IndexCatalog(root, "a", fingerprint=ENC.fingerprint)
    loads: list[Path] = []
    real_open = indexes.LiveIndex.open

    def counting_open(path: Path, **kwargs: object) -> indexes.LiveIndex:
        loads.append(path)
        return real_open(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(indexes.LiveIndex, "open", counting_open)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(catalog.get("b"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [root / "b"] and len({id(g) for g in got}) == 1


def test_bad_unknown_and_foreign_indexes_are_refused_by_name(root: Path) -> None:
    build(root, "foreign", {"x": "text"}, fingerprint="other-encoder")
    catalog = IndexCatalog(root, "a", fingerprint=ENC.fingerprint)
    with pytest.raises(InvalidInputError, match=r"index name '\.\./a'"):
        catalog.get("../a")
    with pytest.raises(IndexNotFound, match=r"no index 'zzz' .*there are: a, b, foreign"):
        catalog.activate("zzz")
    with pytest.raises(IndexInvalid, match="'other-encoder'"):
        catalog.activate("foreign")
    assert catalog.active == "a"  # a failed switch changes nothing


class SwitchingEncoder:
    """The real test encoder; its first question encoding lands a switch of the active index
    in the middle of the retrieval (what a concurrent PUT /index does)."""

    def __init__(self, catalog: IndexCatalog) -> None:
        self.catalog, self.switched = catalog, False
        self.fingerprint, self.dim = ENC.fingerprint, ENC.dim

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        if not self.switched:
            self.switched = True
            self.catalog.activate("b")
        return ENC.encode_questions(questions)

    def encode_passages(self, passages: Sequence[object], **kwargs: object) -> np.ndarray:
        raise AssertionError("not used")


def test_a_request_finishes_on_the_index_it_started_with(root: Path) -> None:
    catalog = IndexCatalog(root, "a", fingerprint=ENC.fingerprint)
    retriever = Retriever(SwitchingEncoder(catalog), catalog)  # type: ignore[arg-type]
    question = ["What is the capital of Veldoria?"]
    first = retriever.retrieve(question, 1)[0][0].passage.text
    assert "Marnsk" in first and catalog.active == "b"  # switched mid-call, answered from a
    assert "Tolvar" in retriever.retrieve(question, 1)[0][0].passage.text
    assert "Marnsk" in retriever.retrieve(question, 1, index="a")[0][0].passage.text


def test_a_single_index_retriever_refuses_a_name(root: Path) -> None:
    retriever = Retriever(ENC, MemoryStore(PassageIndex.load(root / "a"), "a"))  # type: ignore[arg-type]
    with pytest.raises(IndexNotFound, match=r"'b' asked for, .* one index, 'a'"):
        retriever.retrieve(["q"], 1, index="b")
    assert "Marnsk" in retriever.retrieve(["capital of Veldoria"], 1, index="a")[0][0].passage.text


def test_prepare_rebuilds_an_outdated_demo_index_and_refuses_another(
    tmp_path: Path, tiny_generators: dict[str, Path]
) -> None:
    import json

    from app.retrieval.manifest import FORMAT_VERSION, IndexOutdated
    from app.settings import Settings
    from app.wiring import prepare

    source = tmp_path / "demo.jsonl"
    source.write_text(json.dumps({"id": "d", "title": "D", "text": "Demo text."}) + "\n")
    for name in ("demo", "mine"):
        build(tmp_path / "index", name, {"old": "built by an older lorag"})
        manifest = tmp_path / "index" / name / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 1}))
    settings = Settings(index_dir=tmp_path / "index", generator=str(tiny_generators["t5"]))
    prepare(settings, demo_source=source)
    rebuilt = PassageIndex.load(tmp_path / "index" / "demo")
    assert rebuilt.manifest.format_version == FORMAT_VERSION
    assert [p.text for p in rebuilt.passages] == ["Demo text."]
    with pytest.raises(IndexOutdated, match=r"mine.*version 1"):
        prepare(settings.model_copy(update={"index_name": "mine"}), demo_source=source)
