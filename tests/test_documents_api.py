"""POST/GET/DELETE /documents and /index through the real app: real encoder, real FAISS index,
tiny generator. Each test works on its own copy of the facts index."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

ADMIN = {"authorization": "Bearer s3cret"}
NEW_DOC = {
    "id": "moon-zeta",
    "title": "Zeta Moon",
    "text": "Zeta is the third moon of the planet Orvan. Its surface is covered in salt "
    "flats that shine pink at dawn.",
    "metadata": {"source": "test", "year": 2030},
}
QUESTION = "What covers the surface of the moon Zeta?"

Factory = Callable[..., TestClient]


@pytest.fixture
def root(index_root: Path, tmp_path: Path) -> Path:
    """A private index root holding a copy of the session's `facts` index."""
    mine = tmp_path / "index"
    shutil.copytree(index_root / "facts", mine / "facts")
    return mine


@pytest.fixture
def app_factory(root: Path, client_factory: Factory) -> Factory:
    """conftest's client_factory on the private index root, with an admin token."""

    def make(**extra: object) -> TestClient:
        extra.setdefault("admin_token", "s3cret")
        return client_factory("t5", index_dir=root, **extra)

    return make


def retrieved(client: TestClient, question: str = QUESTION, **body: object) -> list[dict]:
    resp = client.post("/ask", json={"question": question, "top_k": 3, **body})
    assert resp.status_code == 200, resp.text
    passages: list[dict] = resp.json()["passages"]
    return passages


def all_texts(client: TestClient, questions: list[str]) -> set[str]:
    return {p["text"] for q in questions for p in retrieved(client, q, top_k=50)}


def test_add_replace_delete_are_visible_to_the_next_ask(app_factory: Factory) -> None:
    client = app_factory()
    assert "moon-zeta" not in {p["doc_id"] for p in retrieved(client)}

    resp = client.post("/documents", json={"documents": [NEW_DOC]}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "index": "facts",
        "documents": [{"id": "moon-zeta", "passages": 1, "replaced": False}],
    }
    top = retrieved(client)[0]
    assert (top["doc_id"], top["title"]) == ("moon-zeta", "Zeta Moon")
    assert "salt flats" in top["text"]
    doc = client.get("/documents/moon-zeta").json()
    assert doc["metadata"] == {"source": "test", "year": 2030} and doc["index"] == "facts"

    replaced = {**NEW_DOC, "text": "Zeta is the third moon of Orvan. Its surface is black glass."}
    resp = client.post("/documents", json={"documents": [replaced]}, headers=ADMIN)
    assert resp.json()["documents"][0]["replaced"] is True
    zeta = [p for p in retrieved(client, top_k=50) if p["doc_id"] == "moon-zeta"]
    assert [p["text"] for p in zeta] == [replaced["text"]]  # one copy, the new text

    assert client.delete("/documents/moon-zeta", headers=ADMIN).status_code == 204
    texts = all_texts(client, [QUESTION, "black glass surface of Orvan's moon"])
    assert not any("Zeta" in t for t in texts)  # never returned again
    assert len(texts) == 6  # the six original facts are all still there
    gone = client.delete("/documents/moon-zeta", headers=ADMIN)
    assert gone.status_code == 404 and "'moon-zeta'" in gone.json()["detail"]
    assert client.get("/documents/moon-zeta").status_code == 404


def test_deleting_an_original_document_removes_it(app_factory: Factory) -> None:
    client = app_factory()
    question = "What are the rings of Zorblax made of?"
    assert retrieved(client, question)[0]["doc_id"] == "zorblax"
    assert client.delete("/documents/zorblax", headers=ADMIN).status_code == 204
    assert "zorblax" not in {p["doc_id"] for p in retrieved(client, question, top_k=50)}
    metrics = client.get("/metrics").text
    assert "lorag_index_passages 5.0" in metrics
    assert 'lorag_named_index_passages{index="facts"} 5.0' in metrics
    assert 'lorag_index_pending_updates{index="facts"} 1.0' in metrics


def test_restart_holds_exactly_what_was_acknowledged(app_factory: Factory, root: Path) -> None:
    client = app_factory()
    docs = [{**NEW_DOC, "id": f"n{i}", "text": f"{NEW_DOC['text']} Number {i}."} for i in range(3)]
    assert client.post("/documents", json={"documents": docs}, headers=ADMIN).status_code == 200
    assert client.delete("/documents/n1", headers=ADMIN).status_code == 204
    assert client.delete("/documents/piano", headers=ADMIN).status_code == 204
    expected = all_texts(client, [QUESTION, "How does a piano make sound?"])
    # a crash now (no shutdown compaction) leaves the snapshot and the log as they are
    shutil.copytree(root / "facts", root / "crashed")
    client.__exit__(None, None, None)  # a clean shutdown compacts instead

    for name in ("facts", "crashed"):
        again = app_factory(index_name=name)
        assert all_texts(again, [QUESTION, "How does a piano make sound?"]) == expected
        listed = {i["name"]: i for i in again.get("/index").json()["indexes"]}
        pending = 0 if name == "facts" else 3  # compacted at shutdown, or replayed from the log
        assert listed[name]["pending_updates"] == pending and listed[name]["documents"] == 7
        assert again.get("/documents/n1").status_code == 404
        assert again.get("/documents/n2").json()["passages"] == [docs[2]["text"]]


def test_mutating_routes_need_the_admin_token(app_factory: Factory) -> None:
    client = app_factory()
    calls = [
        ("POST", "/documents", {"documents": [NEW_DOC]}),
        ("DELETE", "/documents/zorblax", None),
        ("PUT", "/index", {"name": "facts"}),
        ("POST", "/index/facts/compact", None),
    ]
    for method, url, body in calls:
        resp = client.request(method, url, json=body)
        assert resp.status_code == 401, (method, url)
        assert "LORAG_ADMIN_TOKEN" in resp.json()["detail"]
    assert client.get("/documents/zorblax").status_code == 200  # reading stays open
    assert client.get("/index").status_code == 200
    assert "zorblax" in {p["doc_id"] for p in retrieved(client, "rings of Zorblax")}  # unchanged


@pytest.mark.parametrize(
    ("documents", "needle"),
    [
        ([NEW_DOC, NEW_DOC], "document 1 ('moon-zeta'): id occurs twice"),
        (
            [NEW_DOC, {**NEW_DOC, "id": "blank", "text": "   "}],
            "document 1 ('blank'): text is empty",
        ),
        ([{**NEW_DOC, "text": "x" * 201}], "'moon-zeta'): text has 201 characters, at most 200"),
        ([{**NEW_DOC, "id": f"d{i}"} for i in range(4)], "4 documents in one request, at most 3"),
        ([{**NEW_DOC, "colour": "red"}], "documents.0.colour: Extra inputs are not permitted"),
        ([{"id": "no-text"}], "documents.0.text: Field required"),
        ([], "documents: List should have at least 1 item"),
    ],
)
def test_bad_documents_get_422_naming_the_document(
    app_factory: Factory, documents: list[dict], needle: str
) -> None:
    client = app_factory(max_document_chars=200, max_documents_per_request=3)
    resp = client.post("/documents", json={"documents": documents}, headers=ADMIN)
    assert resp.status_code == 422 and needle in resp.json()["detail"], resp.text
    assert client.get("/documents/moon-zeta").status_code == 404  # nothing was added


def test_named_indexes_switch_atomically_and_ask_can_name_one(
    app_factory: Factory, root: Path
) -> None:
    shutil.copytree(root / "facts", root / "other")
    client = app_factory()
    assert (
        client.post("/documents?index=other", json={"documents": [NEW_DOC]}, headers=ADMIN).json()[
            "index"
        ]
        == "other"
    )
    listing = client.get("/index").json()
    assert listing["active"] == "facts"
    assert {(i["name"], i["loaded"]) for i in listing["indexes"]} == {
        ("facts", True),
        ("other", True),
    }

    assert retrieved(client)[0]["doc_id"] != "moon-zeta"  # the active index lacks it
    assert retrieved(client, index="other")[0]["doc_id"] == "moon-zeta"

    resp = client.put("/index", json={"name": "other"}, headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["active"] == "other"
    assert retrieved(client)[0]["doc_id"] == "moon-zeta"
    assert retrieved(client, index="facts")[0]["doc_id"] != "moon-zeta"
    assert "lorag_index_passages 7.0" in client.get("/metrics").text

    missing = client.put("/index", json={"name": "nope"}, headers=ADMIN)
    assert missing.status_code == 404 and "'nope'" in missing.json()["detail"]
    assert "facts" in missing.json()["detail"]  # names what there is
    bad = client.post("/ask", json={"question": QUESTION, "index": "../facts"})
    assert bad.status_code == 422 and "index" in bad.json()["detail"]
    assert client.get("/index").json()["active"] == "other"  # a failed switch changes nothing


def test_an_index_of_another_encoder_is_refused_naming_it(app_factory: Factory, root: Path) -> None:
    import numpy as np

    from app.contracts import Passage
    from app.retrieval.store import PassageIndex

    PassageIndex.build(
        [Passage("d#0", "d", "t", "text")], np.ones((1, 384), dtype=np.float32), "other-encoder"
    ).save(root / "foreign")
    client = app_factory()
    resp = client.put("/index", json={"name": "foreign"}, headers=ADMIN)
    assert resp.status_code == 422 and "'other-encoder'" in resp.json()["detail"]
    resp = client.post("/ask", json={"question": QUESTION, "index": "foreign"})
    assert resp.status_code == 422 and "'other-encoder'" in resp.json()["detail"]
    assert client.get("/index").json()["active"] == "facts"


def test_compaction_on_demand_folds_the_log(app_factory: Factory, root: Path) -> None:
    client = app_factory()
    client.post("/documents", json={"documents": [NEW_DOC]}, headers=ADMIN)
    assert (root / "facts" / "updates.log").stat().st_size > 0
    resp = client.post("/index/facts/compact", headers=ADMIN)
    assert resp.json() == {"index": "facts", "compacted": True}
    assert (root / "facts" / "updates.log").stat().st_size == 0
    assert client.post("/index/facts/compact", headers=ADMIN).json()["compacted"] is False
    assert retrieved(client)[0]["doc_id"] == "moon-zeta"


def test_the_log_is_compacted_once_it_passes_its_limit(app_factory: Factory, root: Path) -> None:
    client = app_factory(compact_log_records=2)
    for i in range(2):
        doc = {**NEW_DOC, "id": f"z{i}"}
        assert (
            client.post("/documents", json={"documents": [doc]}, headers=ADMIN).status_code == 200
        )
    # compaction runs after the response, in a worker thread
    import time

    deadline = time.monotonic() + 10
    while (root / "facts" / "updates.log").stat().st_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (root / "facts" / "updates.log").stat().st_size == 0
    assert {"z0", "z1"} <= {p["doc_id"] for p in retrieved(client, top_k=10)}


def test_ask_filter_retrieves_only_matching_documents(app_factory: Factory) -> None:
    client = app_factory()
    resp = client.post("/documents", json={"documents": [NEW_DOC]}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    # unfiltered, the new document is the best passage for its own question
    assert retrieved(client)[0]["doc_id"] == "moon-zeta"
    only_new = retrieved(client, filter={"year": {"$gte": 2030}, "source": "test"})
    assert [p["doc_id"] for p in only_new] == ["moon-zeta"]  # k capped at the one match
    assert only_new[0]["metadata"] == NEW_DOC["metadata"]  # passages carry it
    others = retrieved(client, filter={"source": {"$ne": "test"}})
    assert len(others) == 3 and "moon-zeta" not in {p["doc_id"] for p in others}
    resp = client.post("/ask", json={"question": QUESTION, "filter": {"year": {"$near": 1}}})
    assert resp.status_code == 422 and "$near" in resp.text and "year" in resp.text
