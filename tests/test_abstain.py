"""Grounded abstention against a real index: the switch, the threshold, the generator's verdict."""

from __future__ import annotations

import pytest

from app.generation.abstain import ABSTAIN_TEXT, AbstainConfig, refuses, unsupported

ON_TOPIC = "What is Zorblax?"  # Zorblax's passage scores far above the threshold
OFF_TOPIC = "Who painted the Mona Lisa?"  # nothing in the six facts is about it


def _ask(client, question: str, retrieval: str = "dense") -> dict:
    r = client.post("/ask", json={"question": question, "top_k": 3, "retrieval": retrieval})
    assert r.status_code == 200, r.text
    return r.json()


def test_abstains_below_the_threshold_and_keeps_the_passages(client_factory) -> None:
    client = client_factory("llama", abstain=True, abstain_min_score=0.35)
    off, on = _ask(client, OFF_TOPIC), _ask(client, ON_TOPIC)
    # the reference: the gate is the best retrieved score against the documented threshold
    assert max(p["score"] for p in off["passages"]) < 0.35
    assert max(p["score"] for p in on["passages"]) >= 0.35
    assert off["abstained"] is True and off["answer"] == ABSTAIN_TEXT
    assert len(off["passages"]) == 3 and off["generated_tokens"] == 0
    assert on["abstained"] is False and on["generated_tokens"] > 0
    assert on["passages"][0]["doc_id"] == "zorblax"
    # the same passages with the switch off, and an answer generated from them
    plain = client_factory("llama", abstain=False)
    answered = _ask(plain, OFF_TOPIC)
    assert answered["abstained"] is False and answered["generated_tokens"] > 0
    assert [p["id"] for p in answered["passages"]] == [p["id"] for p in off["passages"]]


def test_the_gate_applies_to_hybrid_retrieval_as_to_dense(client_factory) -> None:
    client = client_factory("llama", abstain=True, abstain_min_score=0.35)
    for question in (OFF_TOPIC, ON_TOPIC):
        dense, hybrid = _ask(client, question), _ask(client, question, "hybrid")
        # the reference: dense's decision, from dense's best cosine; hybrid's scores are RRF's
        assert hybrid["abstained"] is dense["abstained"] is (question == OFF_TOPIC)
        assert max(p["score"] for p in hybrid["passages"]) < 0.05
    off = _ask(client, OFF_TOPIC, "hybrid")
    assert off["answer"] == ABSTAIN_TEXT and off["generated_tokens"] == 0
    assert len(off["passages"]) == 3  # what was searched is kept
    # sparse (BM25) has no cosine: not gated, only the generator's own refusal counts; at a
    # threshold above every cosine, dense and hybrid abstain and sparse still answers
    strict = client_factory("llama", abstain=True, abstain_min_score=1.0)
    assert _ask(strict, ON_TOPIC, "hybrid")["abstained"] is True
    sparse = _ask(strict, ON_TOPIC, "sparse")
    assert sparse["passages"][0]["doc_id"] == "zorblax" and sparse["passages"][0]["score"] < 1.0
    assert sparse["abstained"] is False and sparse["generated_tokens"] > 0


def test_a_threshold_above_every_score_abstains_on_everything(client_factory) -> None:
    client = client_factory("llama", abstain=True, abstain_min_score=1.0)
    assert _ask(client, ON_TOPIC)["abstained"] is True
    base = client.get("/v1/models").json()["data"][0]["id"]
    chat = client.post(
        "/v1/chat/completions",
        json={"model": base, "messages": [{"role": "user", "content": ON_TOPIC}]},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["abstained"] is True
    assert chat.json()["choices"][0]["message"]["content"] == ABSTAIN_TEXT


def test_the_generators_own_refusal_counts_and_the_switch_turns_both_off() -> None:
    on, off = AbstainConfig(min_score=0.35), AbstainConfig(enabled=False)
    assert refuses(on, ABSTAIN_TEXT)
    assert refuses(on, "Sorry, the passages do not mention Hamlet.")
    assert not refuses(on, "The documents say Juneau is the capital.")
    assert not refuses(off, ABSTAIN_TEXT)
    assert unsupported(on, [0.2, 0.34]) and not unsupported(on, [0.2, 0.36])
    assert unsupported(on, []) and not unsupported(off, [0.1])
    with pytest.raises(ValueError, match="min_score"):
        AbstainConfig(min_score=1.5)
