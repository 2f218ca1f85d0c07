"""The RAG paper's index hot-swap experiment, in small, with the real offline models.

Two indexes disagree on facts; the service reading one answers from it, and after the swap
it answers from the other, with no retraining. Each mode must follow the index.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORLD_A = [
    {
        "id": "veldoria",
        "title": "Veldoria",
        "text": "Veldoria is a small island nation. "
        "The capital of Veldoria is Marnsk, a harbour city on the north coast.",
    },
    {
        "id": "quill",
        "title": "Quill River",
        "text": "The Quill River flows through Veldoria and is known for its red clay banks.",
    },
]
WORLD_B = [
    {
        "id": "veldoria",
        "title": "Veldoria",
        "text": "Veldoria is a small island nation. "
        "The capital of Veldoria is Tolvar, a mountain town in the south.",
    },
    {
        "id": "quill",
        "title": "Quill River",
        "text": "The Quill River flows through Veldoria and is known for its red clay banks.",
    },
]
QUESTION = "What is the capital of Veldoria?"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.retrieval.builder import build_index
    from app.retrieval.encoders import load_encoder

    root = tmp_path_factory.mktemp("worlds")
    encoder = load_encoder("default", "sentence-transformers")
    for name, docs in (("a", WORLD_A), ("b", WORLD_B)):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        build_index([src], encoder, root / name, show_progress=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["concat", "token"])
def test_swapping_the_index_swaps_the_answer(worlds: Path, tmp_path: Path, mode: str) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from tests.conftest import wait_loaded

    answers = {}
    for name in ("a", "b"):
        settings = Settings(index_dir=worlds, index_name=name, adapters_dir=tmp_path)
        with TestClient(create_app(settings)) as client:
            wait_loaded(client)
            body = {"question": QUESTION, "top_k": 2, "mode": mode, "max_new_tokens": 20}
            data = client.post("/ask", json=body).json()
            assert data["passages"][0]["doc_id"] == "veldoria"
            answers[name] = data["answer"]
    assert "Marnsk" in answers["a"] and "Tolvar" not in answers["a"], answers
    assert "Tolvar" in answers["b"] and "Marnsk" not in answers["b"], answers
