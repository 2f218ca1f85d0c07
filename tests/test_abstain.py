"""Grounded abstention against a real index: the switch, the thresholds, the generator's verdict."""

from __future__ import annotations

import pytest

from app.contracts import Passage
from app.generation.abstain import (
    ABSTAIN_TEXT,
    AbstainConfig,
    answer_support,
    content_words,
    refuses,
    ungrounded,
    unsupported,
)

ON_TOPIC = "What is Zorblax?"  # Zorblax's passage scores far above the threshold
OFF_TOPIC = "Who painted the Mona Lisa?"  # nothing in the six facts is about it


def _ask(client, question: str, retrieval: str = "dense") -> dict:
    r = client.post("/ask", json={"question": question, "top_k": 3, "retrieval": retrieval})
    assert r.status_code == 200, r.text
    return r.json()


def test_abstains_below_the_threshold_and_keeps_the_passages(client_factory) -> None:
    client = client_factory("llama", abstain=True, abstain_min_score=0.35, abstain_min_support=0.0)
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
    client = client_factory("llama", abstain=True, abstain_min_score=0.35, abstain_min_support=0.0)
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
    strict = client_factory("llama", abstain=True, abstain_min_score=1.0, abstain_min_support=0.0)
    assert _ask(strict, ON_TOPIC, "hybrid")["abstained"] is True
    sparse = _ask(strict, ON_TOPIC, "sparse")
    assert sparse["passages"][0]["doc_id"] == "zorblax" and sparse["passages"][0]["score"] < 1.0
    assert sparse["abstained"] is False and sparse["generated_tokens"] > 0


def test_a_threshold_above_every_score_abstains_on_everything(client_factory) -> None:
    client = client_factory("llama", abstain=True, abstain_min_score=1.0, abstain_min_support=0.0)
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


def test_answer_support_counts_stemmed_content_words_found_in_the_passages() -> None:
    passages = [
        Passage("alaska#0", "alaska", "Alaska", "Juneau is the capital city of Alaska."),
        Passage("water#0", "water", "Water", "Water boils at 100 degrees at sea level."),
    ]
    assert content_words("Juneau [1].") == ["juneau"]  # a citation marker is not a word
    assert content_words("The capitals of the states") == ["capit", "state"]  # Snowball stems
    assert answer_support("Juneau [1].", passages) == 1.0
    assert answer_support("The capitals of Alaska", passages) == 1.0  # capitals ~ capital
    assert answer_support("Arthur Schopenhauer wrote it.", passages) == 0.0
    assert answer_support("Water boils at 90 degrees.", passages) == 0.75  # 90 is nowhere
    assert answer_support("It is.", passages) is None  # nothing to check
    on, off = AbstainConfig(min_support=0.5), AbstainConfig(min_support=0.0)
    assert ungrounded(on, "Arthur Schopenhauer", passages)
    assert not ungrounded(on, "Juneau", passages) and not ungrounded(on, "It is.", passages)
    assert not ungrounded(off, "Arthur Schopenhauer", passages)
    assert not ungrounded(AbstainConfig(enabled=False), "Arthur Schopenhauer", passages)
    with pytest.raises(ValueError, match="min_support"):
        AbstainConfig(min_support=1.5)


def test_an_answer_the_passages_do_not_support_is_withheld_after_generation(
    client_factory,
) -> None:
    # the reference: the answer the server gives with the support check off, and its support
    # in the passages it was given
    plain = client_factory("llama", abstain=True, abstain_min_score=0.0, abstain_min_support=0.0)
    answered = _ask(plain, ON_TOPIC)
    assert answered["abstained"] is False and answered["generated_tokens"] > 0
    passages = [Passage(p["id"], p["doc_id"], p["title"], p["text"]) for p in answered["passages"]]
    share = answer_support(answered["answer"], passages)
    assert share is not None and share < 1.0, answered["answer"]  # random tokens: not all found
    # a threshold above its support withholds it: generated, then replaced, passages kept
    strict = client_factory(
        "llama", abstain=True, abstain_min_score=0.0, abstain_min_support=min(1.0, share + 0.01)
    )
    withheld = _ask(strict, ON_TOPIC)
    assert withheld["abstained"] is True and withheld["answer"] == ABSTAIN_TEXT
    assert withheld["generated_tokens"] == answered["generated_tokens"]
    assert [p["id"] for p in withheld["passages"]] == [p["id"] for p in answered["passages"]]
    # at its support exactly the answer stands
    if share > 0:
        at = client_factory("llama", abstain=True, abstain_min_score=0.0, abstain_min_support=share)
        assert _ask(at, ON_TOPIC)["answer"] == answered["answer"]
    # sparse retrieval has no gate, and its answers are checked the same way
    sparse = _ask(plain, ON_TOPIC, "sparse")
    found = answer_support(
        sparse["answer"],
        [Passage(p["id"], p["doc_id"], p["title"], p["text"]) for p in sparse["passages"]],
    )
    expected = found is not None and found < min(1.0, share + 0.01)
    assert _ask(strict, ON_TOPIC, "sparse")["abstained"] is expected
