"""Task bundles served by the real app (real MiniLM encoder and FAISS index, tiny T5): the
question-encoder part changes retrieval for its own requests only, defaults apply when a request
gives none, unload removes both parts, and bad bundles are refused before anything loads.

The reference for question vectors is sentence-transformers itself with the saved PEFT folder
loaded into its transformer by PeftModel.from_pretrained, so lorag's tower is checked too.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from sentence_transformers import SentenceTransformer

from app.lora.bundle import MANIFEST_NAME, QUESTION_DIR, TaskManifest, write_manifest
from app.retrieval.encoders import default_encoder_path, load_encoder
from tests.conftest import FACT_DOCS
from tests.tiny import save_lora_adapter

QUESTIONS = [
    "What are the rings of Zorblax made of?",
    "Where do fishermen use copper nets?",
    "Who built a tidal pendulum clock?",
]


@pytest.fixture(scope="module")
def fingerprint() -> str:
    return load_encoder("default", "sentence-transformers").fingerprint


def save_question_adapter(out: Path, *, seed: int) -> Path:
    """A real PEFT LoRA on MiniLM's transformer, random B so it really moves the vectors."""
    st = SentenceTransformer(str(default_encoder_path()), device="cpu")
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                        init_lora_weights=False)  # fmt: skip
    peft = get_peft_model(st[0].auto_model, config)
    peft.save_pretrained(str(out))
    return out


def make_bundle(
    root: Path, name: str, generator: Path, encoder: str | None, **extra: object
) -> Path:
    folder = root / name
    save_lora_adapter(generator, folder, seed=3)
    save_question_adapter(folder / QUESTION_DIR, seed=4)
    manifest = TaskManifest(question_encoder=QUESTION_DIR, mode="concat", top_k=2, encoder=encoder)
    write_manifest(folder, manifest)
    if extra:
        raw = json.loads((folder / MANIFEST_NAME).read_text())
        (folder / MANIFEST_NAME).write_text(json.dumps({**raw, **extra}))
    return folder


@functools.lru_cache(maxsize=4)
def _reference_model(question_dir: Path | None) -> tuple[SentenceTransformer, np.ndarray]:
    st = SentenceTransformer(str(default_encoder_path()), device="cpu")
    passages = st.encode([f"{d['title']}\n{d['text']}" for d in FACT_DOCS])  # [6, 384]
    if question_dir is not None:
        st[0].model = PeftModel.from_pretrained(st[0].auto_model, str(question_dir)).eval()
    return st, passages


def reference_hits(question_dir: Path | None, question: str, k: int) -> list[tuple[str, float]]:
    """Exact top-k over the facts corpus: (passage doc id, score), the question encoded by
    sentence-transformers with the PEFT adapter loaded into its transformer."""
    st, passages = _reference_model(question_dir)
    q = st.encode([question])[0]
    scores = passages @ q
    order = np.argsort(-scores)[:k]
    return [(FACT_DOCS[i]["id"], float(scores[i])) for i in order]


def hits_of(resp) -> list[tuple[str, float]]:
    assert resp.status_code == 200, resp.text
    return [(p["doc_id"], p["score"]) for p in resp.json()["passages"]]


def assert_hits(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-4)


def test_bundle_serves_its_question_encoder_per_request(
    client_factory, adapters_root: Path, tiny_generators: dict[str, Path], fingerprint: str
) -> None:
    bundle = make_bundle(adapters_root, "task", tiny_generators["t5"], fingerprint)
    client = client_factory("t5")
    resp = client.put("/adapters/task", json={"path": "task"})
    assert resp.status_code == 201, resp.text
    task = resp.json()["task"]
    assert task["mode"] == "concat" and task["top_k"] == 2
    assert task["question_encoder"]["path"] == f"task/{QUESTION_DIR}"
    assert client.get("/adapters").json()["adapters"][0]["task"] == task

    k = 6  # every passage: the whole ranking is compared
    refs = {
        (q, with_task): reference_hits(bundle / QUESTION_DIR if with_task else None, q, k)
        for q in QUESTIONS
        for with_task in (False, True)
    }
    # the adapter really changes retrieval (else the checks below could not tell them apart)
    assert any(refs[(q, True)] != refs[(q, False)] for q in QUESTIONS)
    assert all(
        not np.allclose([s for _, s in refs[(q, True)]], [s for _, s in refs[(q, False)]])
        for q in QUESTIONS
    )

    def ask(q: str, with_task: bool) -> list[tuple[str, float]]:
        body = {"question": q, "top_k": k, **({"adapter": "task"} if with_task else {})}
        return hits_of(client.post("/ask", json=body))

    # concurrent requests with and without the bundle each get their own retrieval
    jobs = [(q, w) for _ in range(3) for q in QUESTIONS for w in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda job: ask(*job), jobs))
    for job, got in zip(jobs, results, strict=True):
        assert_hits(got, refs[job])

    # hybrid: the bundle moves the dense half; BM25 reads the words alone
    def fused(dense: list[str], sparse: list[str]) -> list[str]:
        score: dict[str, float] = {}
        for ranked in (dense, sparse):
            for rank, doc in enumerate(ranked, start=1):
                score[doc] = score.get(doc, 0.0) + 1 / (60 + rank)
        return sorted(dict.fromkeys(dense + sparse), key=lambda d: -score[d])  # ties: first met

    def docs(q: str, **body: object) -> list[str]:
        resp = client.post("/ask", json={"question": q, "top_k": k, **body})
        return [d for d, _ in hits_of(resp)]

    differs = False
    for q in QUESTIONS:
        sparse = docs(q, retrieval="sparse")
        assert docs(q, retrieval="sparse", adapter="task") == sparse
        want = fused([d for d, _ in refs[(q, True)]], sparse)
        assert docs(q, retrieval="hybrid", adapter="task") == want
        differs |= want != fused([d for d, _ in refs[(q, False)]], sparse)
    assert differs  # fusing the base's dense list instead would have failed above

    # the bundle's default top_k applies when the request gives none; the request's wins
    assert len(client.post("/ask", json={"question": QUESTIONS[0], "adapter": "task"}).json()[
        "passages"]) == 2  # fmt: skip
    assert len(client.post("/ask", json={"question": QUESTIONS[0]}).json()["passages"]) == 5

    # unload removes both parts
    assert client.delete("/adapters/task").status_code == 204
    service = client.app.state.lorag.service
    assert "task" not in service.tasks.questions and service.tasks.manifest("task") is None
    assert client.get("/adapters/task").status_code == 404


def test_lazy_load_of_a_bundle_uses_its_question_encoder(
    client_factory, adapters_root: Path, tiny_generators: dict[str, Path], fingerprint: str
) -> None:
    bundle = make_bundle(adapters_root, "lazy", tiny_generators["t5"], fingerprint)
    client = client_factory("t5")
    got = hits_of(client.post("/ask", json={"question": QUESTIONS[1], "adapter": "lazy"}))
    assert_hits(got, reference_hits(bundle / QUESTION_DIR, QUESTIONS[1], 2))


def test_plain_folder_loads_as_before_and_clears_a_bundle(
    client_factory, adapters_root: Path, tiny_generators: dict[str, Path], fingerprint: str
) -> None:
    make_bundle(adapters_root, "task", tiny_generators["t5"], fingerprint)
    save_lora_adapter(tiny_generators["t5"], adapters_root / "plain", seed=5)
    client = client_factory("t5")
    resp = client.put("/adapters/plain", json={"path": "plain"})
    assert resp.status_code == 201 and resp.json()["task"] is None
    assert client.put("/adapters/x", json={"path": "task"}).json()["task"] is not None
    # the same name replaced by a plain folder: the question part goes with the old bundle
    resp = client.put("/adapters/x", json={"path": "plain"})
    assert resp.status_code == 200 and resp.json()["task"] is None
    questions = client.app.state.lorag.service.tasks.questions
    assert "x" not in questions and "plain" not in questions
    base = hits_of(client.post("/ask", json={"question": QUESTIONS[0], "top_k": 6}))
    with_x = hits_of(
        client.post("/ask", json={"question": QUESTIONS[0], "top_k": 6, "adapter": "x"})
    )
    assert_hits(with_x, base)


BAD_MANIFESTS = {
    "up": ({"question_encoder": "../plain"}, "inside the bundle"),
    "absolute": ({"question_encoder": "/etc"}, "inside the bundle"),
    "missing": ({"question_encoder": "missing"}, "not in the bundle"),
    "top-k": ({"top_k": 0}, "top_k must be an integer"),
    "mode": ({"mode": "beam"}, "mode 'beam'"),
    "version": ({"format_version": 9}, "format_version 9"),
    "unknown": ({"surprise": 1}, "unknown keys ['surprise']"),
}


def test_bad_bundles_are_refused_before_anything_loads(
    client_factory,
    adapters_root: Path,
    tiny_generators: dict[str, Path],
    fingerprint: str,
    tmp_path: Path,
) -> None:
    t5 = tiny_generators["t5"]
    save_lora_adapter(t5, adapters_root / "plain", seed=5)
    expected: dict[str, list[str]] = {}
    for name, (change, message) in BAD_MANIFESTS.items():
        make_bundle(adapters_root, name, t5, fingerprint, **change)
        expected[name] = [message]
    other = "sentence-transformers:other-model@0123456789ab"
    make_bundle(adapters_root, "alien", t5, other)
    expected["alien"] = [other, fingerprint]  # both encoders named
    pickled = make_bundle(adapters_root, "pickled", t5, fingerprint) / QUESTION_DIR
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    expected["pickled"] = ["safetensors is required"]
    outside = save_question_adapter(tmp_path / "outside", seed=6)
    linked = make_bundle(adapters_root, "linked", t5, fingerprint, question_encoder="qlink")
    (linked / "qlink").symlink_to(outside, target_is_directory=True)
    expected["linked"] = ["outside the adapters root"]

    client = client_factory("t5")
    service = client.app.state.lorag.service
    for name, messages in expected.items():
        resp = client.put(f"/adapters/{name}", json={"path": name})
        assert resp.status_code == 422, (name, resp.text)
        for m in messages:
            assert m in resp.json()["detail"], (name, resp.text)
        assert client.get(f"/adapters/{name}").status_code == 404  # nothing half-loaded
    # a lazy load of a bad bundle is refused the same way
    resp = client.post("/ask", json={"question": QUESTIONS[0], "adapter": "alien"})
    assert resp.status_code == 422 and other in resp.text
    assert client.get("/adapters").json()["adapters"] == []
    assert not any(name in service.tasks.questions for name in expected)
