"""The real app (real lifespan, real encoder and FAISS index, tiny generators) over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from tests.tiny import save_lora_adapter

QUESTION = "What are the rings of Zorblax made of?"
ASKS = {"/ask", "/v1/chat/completions", "/v1/completions"}  # POSTs that only read (API token)


def ask(client, **body):
    body.setdefault("question", QUESTION)
    return client.post("/ask", json=body)


def test_health_ready_and_openapi(client_factory):
    client = client_factory()
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/ask", "/adapters", "/adapters/{name}", "/ready", "/metrics"} <= set(paths)


def test_ask_cites_the_passage_that_holds_the_fact(client_factory, backend):
    client = client_factory(backend)
    resp = ask(client, top_k=3)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert isinstance(data["answer"], str)
    assert data["adapter"] is None and data["mode"] == "concat"
    passages = data["passages"]
    assert len(passages) == 3
    assert passages[0]["doc_id"] == "zorblax"  # the real encoder finds the fact
    scores = [p["score"] for p in passages]
    assert scores == sorted(scores, reverse=True)
    assert sum(p["weight"] for p in passages) == pytest.approx(1.0)
    assert passages[0]["weight"] > passages[-1]["weight"]
    assert set(data["timings_ms"]) == {"retrieve", "generate", "total", "reused_prompt_tokens"}
    assert resp.headers["x-request-id"] == data["request_id"]


def _reference_answer(model_dir: Path, adapter_dir: Path | None, client, backend: str) -> str:
    """What plain transformers (+ PEFT) generate for the prompt the service built."""
    state = client.app.state.lorag
    gen = state.components.generator
    hits = state.components.retriever.retrieve([QUESTION], 2)[0]
    cls = AutoModelForSeq2SeqLM if backend == "t5" else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = gen.prompt(QUESTION, [h.passage for h in hits], 8)
    enc = gen._encode([prompt], gen.max_input_tokens(8))  # the service's own prompt, one row
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    if backend != "t5":
        out = out[:, enc["input_ids"].shape[1] :]
    return tok.decode(out[0], skip_special_tokens=True).strip()


def test_adapter_lifecycle_matches_peft(client_factory, backend, tiny_generators, adapters_root):
    model_dir = tiny_generators[backend]
    save_lora_adapter(model_dir, adapters_root / "a", seed=1)
    client = client_factory(backend, lazy_load_adapters=False)  # unloaded stays unloaded

    base = ask(client, top_k=2).json()["answer"]
    assert base == _reference_answer(model_dir, None, client, backend)

    put = client.put("/adapters/a", json={"path": "a"})
    assert put.status_code == 201, put.text
    info = put.json()
    assert info["name"] == "a" and info["rank"] == 8 and info["bytes"] > 0 and info["version"]
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["a"]
    assert client.get("/adapters/a").json()["version"] == info["version"]

    adapted = ask(client, top_k=2, adapter="a").json()
    assert adapted["adapter"] == "a" and adapted["adapter_version"] == info["version"]
    assert adapted["answer"] == _reference_answer(model_dir, adapters_root / "a", client, backend)
    assert adapted["answer"] != base  # the adapter really changes the output

    assert client.delete("/adapters/a").status_code == 204
    assert client.get("/adapters").json()["adapters"] == []
    assert ask(client, top_k=2).json()["answer"] == base  # the base again after unload
    gone = ask(client, adapter="a")
    assert gone.status_code == 404 and "'a'" in gone.json()["detail"]


def test_put_on_a_loaded_name_replaces_it(client_factory, tiny_generators, adapters_root):
    model_dir = tiny_generators["t5"]
    save_lora_adapter(model_dir, adapters_root / "v1", seed=1)
    save_lora_adapter(model_dir, adapters_root / "v2", seed=2)
    client = client_factory()
    assert client.put("/adapters/task", json={"path": "v1"}).status_code == 201
    first = ask(client, adapter="task").json()
    replaced = client.put("/adapters/task", json={"path": "v2"})
    assert replaced.status_code == 200
    second = ask(client, adapter="task").json()
    assert first["adapter_version"] != second["adapter_version"]
    assert second["adapter_version"] == replaced.json()["version"]
    assert first["answer"] != second["answer"]
    assert len(client.get("/adapters").json()["adapters"]) == 1


def test_concurrent_mixed_adapter_requests_get_their_own_answers(
    client_factory, backend, tiny_generators, adapters_root
):
    model_dir = tiny_generators[backend]
    for name, seed in (("a", 1), ("b", 2)):
        save_lora_adapter(model_dir, adapters_root / name, seed=seed)
    client = client_factory(backend, batch_wait_ms=50.0)
    for name in ("a", "b"):
        assert client.put(f"/adapters/{name}", json={"path": name}).status_code == 201
    questions = [QUESTION, "How does a piano make sound?", "Who was Oskar Lindqvist?"]
    jobs = [(q, a, "concat") for q in questions for a in (None, "a", "b")]
    jobs += [(q, a, "token") for q in questions[:2] for a in (None, "a", "b")]

    def body(job):
        q, a, mode = job
        return {"question": q, "adapter": a, "mode": mode, "top_k": 2}

    alone = {job: client.post("/ask", json=body(job)).json()["answer"] for job in jobs}
    assert len({alone[(QUESTION, a, "concat")] for a in (None, "a", "b")}) == 3  # really differ

    async def together() -> list[dict]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            resps = await asyncio.gather(*(ac.post("/ask", json=body(job)) for job in jobs))
        return [r.json() for r in resps]

    results = client.portal.call(together)
    assert [r["answer"] for r in results] == [alone[job] for job in jobs]
    engine = client.app.state.lorag.service.engine
    assert max(engine.stats.batch_sizes) > 1  # they really were batched together


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"question": ""}, "question"),
        ({"question": "   "}, "blank"),
        ({"question": "x" * 2001}, "question"),
        ({"question": "hi\x00there"}, "control character"),
        ({"question": "q", "top_k": 0}, "top_k"),
        ({"question": "q", "top_k": 51}, "top_k"),
        ({"question": "q", "top_k": "five"}, "top_k"),
        ({"question": "q", "max_new_tokens": 513}, "max_new_tokens"),
        ({"question": "q", "mode": "magic"}, "mode"),
        ({"question": "q", "adapter": "../etc"}, "adapter"),
        ({"question": "q", "colour": "red"}, "colour"),
        ({}, "question"),
    ],
)
def test_bad_ask_bodies_get_422_naming_the_field(client_factory, body, needle):
    client = client_factory()
    resp = client.post("/ask", json=body)
    assert resp.status_code == 422
    assert needle in resp.json()["detail"]
    assert ask(client).status_code == 200  # still serving


def test_malformed_json_is_422(client_factory):
    client = client_factory()
    resp = client.post(
        "/ask", content=b'{"question": ', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422 and "JSON" in resp.json()["detail"]


def test_adapter_errors_name_the_problem_and_keep_what_is_loaded(
    client_factory, tiny_generators, adapters_root
):
    model_dir = tiny_generators["t5"]
    save_lora_adapter(model_dir, adapters_root / "good", seed=1)
    (adapters_root / "pickle").mkdir()
    (adapters_root / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    (adapters_root / "pickle" / "adapter_config.json").write_text(
        (adapters_root / "good" / "adapter_config.json").read_text()
    )
    client = client_factory()
    assert client.put("/adapters/good", json={"path": "good"}).status_code == 201
    before = ask(client, adapter="good").json()["answer"]

    cases = [
        ("x", {"path": "missing"}, 404, "missing"),
        ("x", {"path": "../outside"}, 422, ".."),
        ("x", {"path": "/etc"}, 422, "/etc"),
        ("x", {"path": "pickle"}, 422, "safetensors"),
        ("good", {"path": "pickle"}, 422, "safetensors"),  # a bad replace keeps the old one
        ("x", {}, 422, "path"),
    ]
    for name, body, code, needle in cases:
        resp = client.put(f"/adapters/{name}", json=body)
        assert resp.status_code == code, (body, resp.text)
        assert needle in resp.json()["detail"], (body, resp.text)
    assert client.delete("/adapters/nope").status_code == 404
    assert "'nope'" in client.delete("/adapters/nope").json()["detail"]
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["good"]
    assert ask(client, adapter="good").json()["answer"] == before


def test_admin_token_guards_mutating_routes(client_factory, tiny_generators, adapters_root):
    save_lora_adapter(tiny_generators["t5"], adapters_root / "a", seed=1)
    client = client_factory(admin_token="s3cret")
    assert client.put("/adapters/a", json={"path": "a"}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.put("/adapters/a", json={"path": "a"}, headers=wrong).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert client.put("/adapters/a", json={"path": "a"}, headers=ok).status_code == 201
    assert client.delete("/adapters/a").status_code == 401
    assert client.delete("/adapters/a", headers=ok).status_code == 204
    assert ask(client).status_code == 200  # reading stays open


def test_every_mutating_route_requires_the_admin_token(client_factory):
    """Enumerated from the app's OpenAPI paths, so a route added later cannot be left open:
    every PUT, POST and DELETE except the asks (/ask and OpenAI's completions) answers 401
    without the token, and changes nothing."""
    client = client_factory(admin_token="s3cret")
    before = (client.get("/adapters").json(), client.get("/index").json())
    paths = client.get("/openapi.json").json()["paths"]
    mutating = [
        (method.upper(), path)
        for path, ops in paths.items()
        for method in sorted(ops)
        if method in {"put", "post", "delete", "patch"} and path not in ASKS
    ]
    # adapters, documents and indexes at least; the test must not pass on an empty list
    assert {"/adapters/{name}", "/documents", "/index"} <= {path for _, path in mutating}
    for method, path in mutating:
        url = path.replace("{name}", "demo").replace("{doc_id}", "doc")
        resp = client.request(method, url, json={})
        assert resp.status_code == 401, (method, url, resp.text)
        body = resp.json()  # /v1 answers in OpenAI's shape
        assert "LORAG_ADMIN_TOKEN" in (
            body["error"]["message"] if "error" in body else body["detail"]
        )
    assert (client.get("/adapters").json(), client.get("/index").json()) == before


def test_index_from_another_encoder_is_refused_with_the_reason(
    client_factory, index_root, tmp_path
):
    import numpy as np

    from app.contracts import Passage
    from app.retrieval.store import PassageIndex

    other = PassageIndex.build(
        [Passage("d#0", "d", "t", "text")], np.ones((1, 8), dtype=np.float32), "other-encoder"
    )
    other.save(index_root / "other")
    client = client_factory(index_name="other")
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert "other-encoder" in ready.json()["detail"]
    resp = ask(client)
    assert resp.status_code == 503 and "other-encoder" in resp.json()["detail"]


def test_metrics_count_requests_and_batches(client_factory):
    client = client_factory()
    tokens = ask(client).json()["generated_tokens"]
    assert tokens > 0
    text = client.get("/metrics").text
    assert 'lorag_http_requests_total{method="POST",route="/ask",status="200"} 1.0' in text
    assert (
        f'lorag_generated_tokens_total{{adapter="__base__",mode="concat"}} {float(tokens)}' in text
    )
    assert "lorag_batch_rows_count 1.0" in text
    assert "lorag_index_passages 6.0" in text


def test_oversized_body_is_413_and_the_server_keeps_serving(client_factory):
    client = client_factory(max_body_bytes=4096)
    resp = client.post("/ask", json={"question": "q" * 1000, "pad": "x" * 8000})
    assert resp.status_code == 413
    assert "4096" in resp.json()["detail"]
    assert "x-request-id" in resp.headers
    assert ask(client).status_code == 200


def test_api_token_guards_ask_only_when_set(client_factory):
    client = client_factory(api_token="reader")
    assert ask(client).status_code == 401
    auth = {"Authorization": "Bearer reader"}
    ok = client.post("/ask", json={"question": QUESTION}, headers=auth)
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200  # probes stay open


def test_request_id_is_echoed_or_assigned_and_cors_is_off(client_factory):
    client = client_factory()
    mine = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    hostile = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"
    pre = client.options(
        "/ask",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_marginalized_modes_return_posterior_weights(client_factory, backend, mode):
    client = client_factory(backend)
    resp = ask(client, top_k=3, mode=mode)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["mode"] == mode
    weights = [p["weight"] for p in data["passages"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    prior = ask(client, top_k=3, mode="concat").json()["passages"]
    # the posterior p(z|x,y) is not the prior p(z|x): the answer moved the weights
    assert weights != pytest.approx([p["weight"] for p in prior], abs=1e-6)


def test_token_mode_through_the_server_equals_the_rag_function(client_factory, backend):
    """The served RAG-Token answer is what rag_token_generate gives on the same inputs."""
    import torch

    from app.generation.step_batch import pad
    from tests.tensor_rag import rag_token_generate

    client = client_factory(backend)
    data = ask(client, top_k=3, mode="token").json()
    gen = client.app.state.lorag.components.generator
    passages = client.app.state.lorag.components.retriever.retrieve([QUESTION], 3)[0]
    prompts = gen.passage_prompts(QUESTION, [h.passage for h in passages], reserve=8)
    ids, mask = pad(prompts, gen.pad_id, left=gen.kind == "causal", device=gen.device)
    scores = torch.tensor([[h.score for h in passages]])
    kwargs = {
        "n_docs": 3,
        "max_new_tokens": 8,
        "eos_token_id": gen.tokenizer.eos_token_id,
        "pad_token_id": gen.tokenizer.pad_token_id,
    }
    if backend == "t5":
        kwargs["decoder_start_token_id"] = gen.model.config.decoder_start_token_id
    out = rag_token_generate(gen.model, ids, mask, scores, **kwargs)
    assert data["answer"] == gen._decode(out.sequences[0])
    got = [p["weight"] for p in data["passages"]]
    assert got == pytest.approx(out.doc_posterior[0].tolist(), abs=1e-6)


def test_a_client_that_disconnects_takes_its_queued_row_out_of_the_engine(client_factory):
    """Raw ASGI, so the test controls when the client leaves: the ask is queued behind a
    busy model thread, the connection drops, and its row never runs (499 in the metrics)."""
    import asyncio
    import json
    import time

    client = client_factory()
    app = client.app
    engine = app.state.lorag.service.engine
    rows_before = engine.stats.rows

    async def scenario() -> list[dict]:
        busy = asyncio.ensure_future(engine.run_exclusive(lambda: time.sleep(1.5)))
        body = json.dumps({"question": QUESTION}).encode()
        inbox = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()
        sent: list[dict] = []

        async def receive() -> dict:
            if inbox:
                return inbox.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/ask",
            "raw_path": b"/ask",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 5000),
            "server": ("test", 80),
        }
        handler = asyncio.ensure_future(app(scope, receive, send))
        deadline = time.monotonic() + 10
        while engine.queue_depth < 1:  # retrieved, and waiting behind the busy model thread
            assert time.monotonic() < deadline and not handler.done()
            await asyncio.sleep(0.01)
        gone.set()
        await handler
        await busy
        return sent

    sent = client.portal.call(scenario)
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 499
    assert ask(client).status_code == 200  # the server goes on
    assert engine.stats.rows == rows_before + 1  # only the last ask ran; the one that left did not
    text = client.get("/metrics").text
    assert 'lorag_http_requests_total{method="POST",route="/ask",status="499"} 1.0' in text
