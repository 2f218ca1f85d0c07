"""Fixtures shared by the API, engine and end-to-end tests: a real index, tiny generators."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests ask tiny generators arbitrary questions ("q") over a six-fact index, where the default
# abstention would answer before generating; tests/test_abstain.py turns it on by name.
os.environ.setdefault("LORAG_ABSTAIN", "false")

import torch

# Tiny models spend their time in per-op overhead, where a second thread only adds
# synchronization (6x slower measured here on a busy 2-core machine).
torch.set_num_threads(1)

# Facts with one clear home each, so retrieval can be checked exactly.
FACT_DOCS = [
    {
        "id": "zorblax",
        "title": "Zorblax",
        "text": "Zorblax is a purple gas giant orbiting the star Quell. "
        "Astronomers measured its rings in 2031 and found them made of frozen ammonia.",
    },
    {
        "id": "tarn",
        "title": "Tarn of Velm",
        "text": "The Tarn of Velm is a mountain lake famous for its "
        "glowing eels. Fishermen there use nets woven from copper wire.",
    },
    {
        "id": "oskar",
        "title": "Oskar Lindqvist",
        "text": "Oskar Lindqvist was a Swedish clockmaker who built "
        "the first pendulum clock powered by tidal water in the town of Kalmar.",
    },
    {
        "id": "bread",
        "title": "Sourdough",
        "text": "Sourdough bread rises because wild yeast and lactic acid "
        "bacteria in the starter ferment the flour and release carbon dioxide.",
    },
    {
        "id": "piano",
        "title": "Piano",
        "text": "A piano makes sound when felt hammers strike steel strings, "
        "and the soundboard amplifies their vibration.",
    },
    {
        "id": "glacier",
        "title": "Glaciers",
        "text": "Glaciers form where snow accumulates faster than it "
        "melts, compressing over centuries into dense blue ice that slowly flows downhill.",
    },
]


@pytest.fixture(scope="session")
def fact_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "facts.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in FACT_DOCS))
    return path


@pytest.fixture(scope="session")
def index_root(tmp_path_factory: pytest.TempPathFactory, fact_source: Path) -> Path:
    """index_dir holding `facts`, built with the real default encoder (all-MiniLM-L6-v2)."""
    from app.retrieval.builder import build_index
    from app.retrieval.encoders import load_encoder

    root = tmp_path_factory.mktemp("index")
    build_index(
        [fact_source],
        load_encoder("default", "sentence-transformers"),
        root / "facts",
        show_progress=False,
    )
    return root


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_generators(models_root: Path) -> dict[str, Path]:
    from tests.tiny import tiny_llama, tiny_t5

    return {"t5": tiny_t5(models_root), "llama": tiny_llama(models_root)}


@pytest.fixture(params=["t5", "llama"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def adapters_root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    root.mkdir()
    return root


def make_settings(generator: Path, index_root: Path, adapters_root: Path, **extra: object):
    from app.settings import Settings

    values: dict[str, object] = {
        "generator": str(generator),
        "index_dir": index_root,
        "index_name": "facts",
        "adapters_dir": adapters_root,
        "cache_dir": adapters_root.parent / "cache",
        "max_new_tokens": 8,
    }
    return Settings(**{**values, **extra})


@pytest.fixture
def client_factory(index_root: Path, adapters_root: Path, tiny_generators: dict[str, Path]):
    """Yields a function that starts the real app (real lifespan) and waits until loaded."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    clients: list[TestClient] = []

    def make(backend: str = "t5", **extra: object) -> TestClient:
        settings = make_settings(tiny_generators[backend], index_root, adapters_root, **extra)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        wait_loaded(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def wait_loaded(client) -> None:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if client.get("/ready").json()["status"] in ("ready", "failed"):
            return
        time.sleep(0.05)
    raise AssertionError("app did not finish loading in 120 s")


# ---- a real PostgreSQL + pgvector (tests/pg.py): one server per session, a database per test


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory):
    from tests.pg import PgServer

    server = PgServer(tmp_path_factory.mktemp("pg") / "data")
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server (dropped after the test)."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)
