"""The OpenAI-compatible routes (/v1) through the official `openai` SDK, against `lorag serve` in
a real uvicorn process on the tiny llama generator and the facts index.

References: /ask for what a chat completion answers (the same ask), transformers' forward pass
(with PEFT for an adapter) for the prompt log-probabilities, transformers' greedy generate()
for a plain completion. One server for the module, with both tokens set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving import serve
from tests.tiny import save_lora_adapter

openai = pytest.importorskip("openai", reason="needs the openai SDK (dev extra)")

API, ADMIN = "api-secret", "admin-secret"
QUESTION = "What are the rings of Zorblax made of?"
TEXT = "Oskar built a tidal clock in Kalmar."


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, index_root: Path, tiny_generators: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("openai")
    adapters = root / "adapters"
    model_dir = tiny_generators["llama"]
    save_lora_adapter(model_dir, adapters / "a1", seed=1)
    save_lora_adapter(model_dir, adapters / "a2", seed=2)
    env = {
        "LORAG_GENERATOR": str(model_dir),
        "LORAG_INDEX_DIR": str(index_root),
        "LORAG_INDEX_NAME": "facts",
        "LORAG_ADAPTERS_DIR": str(adapters),
        "LORAG_CACHE_DIR": str(root / "cache"),
        "LORAG_MAX_NEW_TOKENS": "8",
        "LORAG_API_TOKEN": API,
        "LORAG_ADMIN_TOKEN": ADMIN,
        "LORAG_TORCH_THREADS": "1",
    }
    with serve(env) as (url, _):
        yield {"url": url, "model_dir": model_dir, "adapters": adapters}


@pytest.fixture(scope="module")
def client(server: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=API, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _admin(server: dict[str, Any], route: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.post(f"{server['url']}/v1/{route}", json=body, headers=headers, timeout=60)


def _ask(server: dict[str, Any], **body: Any) -> dict:
    r = httpx.post(
        f"{server['url']}/ask",
        json={"question": QUESTION, "max_new_tokens": 8, **body},
        headers={"Authorization": f"Bearer {API}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _chat(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": QUESTION}])
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=model, **kwargs)


def test_models_are_the_base_and_the_adapters_loaded_through_vllms_routes(server, client, base):
    assert base == str(Path(server["model_dir"]).resolve())
    before = client.models.list().data
    assert [m.id for m in before if m.id == "a2"] == []
    assert before[0].model_extra["parent"] is None

    loaded = _admin(server, "load_lora_adapter", {"lora_name": "a2", "lora_path": "a2"})
    assert loaded.status_code == 200 and "a2" in loaded.text, loaded.text
    card = {m.id: m for m in client.models.list().data}["a2"]
    assert card.object == "model" and card.owned_by == "lorag"
    assert card.model_extra["parent"] == base and card.model_extra["root"] == "a2"
    assert client.models.retrieve("a2").id == "a2"

    refused = httpx.post(
        f"{server['url']}/v1/unload_lora_adapter", json={"lora_name": "a2"}, timeout=60
    )
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert _admin(server, "unload_lora_adapter", {"lora_name": "a2"}).status_code == 200
    assert "a2" not in [m.id for m in client.models.list().data]
    gone = _admin(server, "unload_lora_adapter", {"lora_name": "a2"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_chat_answers_what_ask_answers_and_streams_the_same_answer(server, client, base):
    asked = _ask(server, top_k=2)
    plain = _chat(client, base, temperature=0, extra_body={"top_k": 2})
    assert plain.object == "chat.completion" and plain.model == base
    choice = plain.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == asked["answer"]
    assert choice.finish_reason == asked["finish_reason"]
    citations = plain.model_extra["citations"]
    assert [c["id"] for c in citations] == [p["id"] for p in asked["passages"]]
    assert citations[0]["doc_id"] == "zorblax"
    assert [c["weight"] for c in citations] == pytest.approx(
        [p["weight"] for p in asked["passages"]]
    )
    usage = plain.usage
    assert usage.completion_tokens == asked["generated_tokens"]
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        _chat(
            client,
            base,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"top_k": 2},
        )
    )
    first = chunks[0]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    assert [c["id"] for c in first.model_extra["citations"]] == [c["id"] for c in citations]
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == usage


def test_an_adapter_is_a_model(server, client, base):
    base_answer = _chat(client, base, temperature=0).choices[0].message.content
    adapted = _chat(client, "a1", temperature=0)  # lazily loaded from adapters/a1
    assert adapted.model == "a1"
    assert adapted.system_fingerprint  # the adapter version that answered
    assert adapted.choices[0].message.content == _ask(server, adapter="a1")["answer"]
    assert adapted.choices[0].message.content != base_answer


def test_rag_options_through_extra_body(client, base):
    three = _chat(client, base, temperature=0, extra_body={"top_k": 3})
    assert len(three.model_extra["citations"]) == 3
    token = _chat(client, base, temperature=0, extra_body={"top_k": 2, "mode": "token"})
    weights = [c["weight"] for c in token.model_extra["citations"]]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)
    chat = _chat(
        client,
        base,
        temperature=0,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Who are you?"},
        ],
        extra_body={"retrieval": False},
    )
    assert chat.model_extra["citations"] == []
    assert 0 < chat.usage.prompt_tokens < three.usage.prompt_tokens  # no passages read


def test_errors_come_in_openais_shape(server, client, base):
    with pytest.raises(openai.NotFoundError) as unknown:
        _chat(client, "no-such-model")
    assert unknown.value.body["code"] == "model_not_found"
    assert "no-such-model" in unknown.value.body["message"]
    bad_key = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.BadRequestError) as empty:
        _chat(client, base, messages=[])
    assert empty.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as last:
        _chat(client, base, messages=[{"role": "assistant", "content": "Hi."}])
    assert "'assistant'" in last.value.body["message"]
    with pytest.raises(openai.BadRequestError) as hot:
        _chat(client, base, temperature=5)
    assert hot.value.body["param"] == "temperature" and "5" in hot.value.body["message"]
    # the native routes keep their {"detail"} shape and 422
    native = httpx.post(
        f"{server['url']}/ask", json={}, headers={"Authorization": f"Bearer {API}"}, timeout=30
    )
    assert native.status_code == 422 and "detail" in native.json()


def test_a_seeded_sample_reproduces_alone_and_among_other_requests(server, base):
    def sample(c: Any, seed: int, question: str = QUESTION) -> Any:
        return c.chat.completions.create(
            model=base,
            messages=[{"role": "user", "content": question}],
            max_tokens=8,
            temperature=1.0,
            seed=seed,
        )

    async def run() -> tuple[str, str, list[str]]:
        c = openai.AsyncOpenAI(base_url=f"{server['url']}/v1", api_key=API, max_retries=0)
        alone = (await sample(c, 7)).choices[0].message.content
        again = (await sample(c, 7)).choices[0].message.content
        crowd = await asyncio.gather(
            *(sample(c, 100 + i, f"Where is the Tarn of Velm {i}?") for i in range(3)),
            sample(c, 7),
            *(sample(c, 200 + i, f"What is sourdough {i}?") for i in range(3)),
        )
        await c.close()
        return alone, again, [r.choices[0].message.content for r in crowd]

    alone, again, crowd = asyncio.run(run())
    assert again == alone
    assert crowd[3] == alone  # while six other requests decoded beside it
    assert len(set(crowd)) > 1  # other seeds and questions sample other answers

    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=API, max_retries=0)
    both = client.chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=1.0,
        seed=7,
        n=2,
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content == alone  # choice i samples with seed + i
    assert both.choices[1].message.content == sample(client, 8).choices[0].message.content


def _reference_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)  # [L, V]: row t-1 predicts token t


def _prompt_ids(model_dir: Path, text: str) -> list[int]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text)["input_ids"]
    return ids[:-1] if ids[-1] == tok.eos_token_id else ids  # a prompt does not end the text


@pytest.mark.parametrize("model", ["base", "a1"])
def test_echoed_prompt_logprobs_equal_a_direct_forward_pass(server, client, base, model):
    model_dir = Path(server["model_dir"])
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if model == "a1":
        reference = PeftModel.from_pretrained(reference, server["adapters"] / "a1").eval()
    ids = _prompt_ids(model_dir, TEXT)
    lp = _reference_logprobs(reference, ids)

    out = client.completions.create(
        model=base if model == "base" else model,
        prompt=TEXT,
        max_tokens=0,
        echo=True,
        logprobs=3,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.text == TEXT
    got = choice.logprobs
    assert len(got.tokens) == len(ids) and "".join(got.tokens) == TEXT
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    expected = [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert got.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for t in range(1, len(ids)):
        # the 3 likeliest and the token itself, by their text (the likelier kept on a clash)
        top = torch.topk(lp[t - 1], 3)
        want: dict[str, float] = {}
        for alt, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            want.setdefault(tok.decode([alt]), value)
        want.setdefault(tok.decode([ids[t]]), float(lp[t - 1, ids[t]]))
        assert got.top_logprobs[t].keys() == want.keys()
        assert list(got.top_logprobs[t].values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert got.text_offset[0] == 0
    assert all(TEXT[o : o + len(t)] == t for t, o in zip(got.tokens, got.text_offset, strict=True))
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0


def test_completions_continue_the_text_as_transformers_does(server, client, base):
    model_dir = Path(server["model_dir"])
    ids = _prompt_ids(model_dir, TEXT)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    plain = client.completions.create(model=base, prompt=TEXT, max_tokens=4, temperature=0)
    assert plain.choices[0].text == expected
    assert plain.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as streamed:
        client.completions.create(model=base, prompt=TEXT, max_tokens=4, stream=True)
    assert streamed.value.body["param"] == "stream"  # only chat streams

    # lm-eval's loglikelihood request: echo, logprobs 1, one generated token after the prompt's
    scored = client.completions.create(
        model=base, prompt=[TEXT, TEXT[:-1]], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    assert [c.index for c in scored.choices] == [0, 1]
    for choice, text in zip(scored.choices, [TEXT, TEXT[:-1]], strict=True):
        got = choice.logprobs
        assert len(got.token_logprobs) == len(_prompt_ids(model_dir, text)) + 1
        assert got.token_logprobs[-1] is None and got.token_logprobs[-2] is not None
        assert choice.text.startswith(text)
    with pytest.raises(openai.BadRequestError) as nothing:
        client.completions.create(model=base, prompt=TEXT, max_tokens=0)
    assert nothing.value.body["param"] == "max_tokens"
