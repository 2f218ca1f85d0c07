"""Concat mode's passage order (LORAG_CONCAT_ORDER): the prompt's layout and the answer's list.

With "stable", two questions that retrieve the same passages in another score order get prompts
whose tokens agree up to the question, which is what lets the prefix KV cache reuse them; with
"score" (the reference) they part at the first passage. Either way the answer lists its
passages as the prompt numbers them, so a citation [n] names the answer's n-th passage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.contracts import GenRow, Passage
from app.generation.config import PromptConfig
from app.generation.generator import Generator
from app.generation.loading import load_generator
from app.generation.prompts import prompt_order, stable_key
from tests.tiny import tiny_llama

# two documents, one of them in two passages; ids "<doc>#<ordinal>", ordinal 10 after 2
A0 = Passage("alpha#0", "alpha", "Alpha", "Alpha is a small town on the river Lek.")
B2 = Passage("beta#2", "beta", "Beta", "Beta's abbey brewed dark beer until 1540.")
B10 = Passage("beta#10", "beta", "Beta", "Beta lies in a valley famous for its cheese.")
STABLE = [A0, B2, B10]


@pytest.fixture(scope="module", params=["plain", "chat"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    chat = request.param == "chat"
    return tiny_llama(tmp_path_factory.mktemp("llama"), chat=chat, name=f"llama-{request.param}")


def generator(model_dir: Path, tmp_path: Path, order: str) -> Generator:
    config = PromptConfig(concat_order=order)  # type: ignore[arg-type]
    return load_generator(str(model_dir), cache_dir=tmp_path, prompt_config=config)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_stable_key_is_document_then_ordinal() -> None:
    assert sorted([B10, A0, B2], key=stable_key) == STABLE
    assert prompt_order(["b10", "a0", "b2"], [B10, A0, B2], "stable") == ["a0", "b2", "b10"]
    assert prompt_order(["b10", "a0", "b2"], [B10, A0, B2], "score") == ["b10", "a0", "b2"]


@pytest.mark.parametrize("order", ["stable", "score"])
def test_same_passages_in_another_score_order_share_the_prefix_up_to_the_question(
    model_dir: Path, tmp_path: Path, order: str
) -> None:
    gen = generator(model_dir, tmp_path, order)
    first = GenRow("Where is Alpha?", [B10, A0, B2], None, 8)
    second = GenRow("What did Beta brew?", [B2, B10, A0], None, 8)
    ids = [gen.concat_prompt(first), gen.concat_prompt(second)]
    texts = [gen.tokenizer.decode(i) for i in ids]
    shared = gen.tokenizer.decode(ids[0][: common_prefix(*ids)])
    rows = [first, second]
    before_question = [t[: t.index(r.question)] for t, r in zip(texts, rows, strict=True)]
    if order == "stable":
        # identical tokens through the last passage, up to the question itself
        assert before_question[0] == before_question[1]
        assert shared.startswith(before_question[0])
        blocks = [f"[1] Alpha: {A0.text}", f"[2] Beta: {B2.text}", f"[3] Beta: {B10.text}"]
        at = [texts[0].index(b) for b in blocks]  # beta#2 before beta#10
        assert at == sorted(at)
    else:  # the reference: retrieval order, so the prompts part at the first passage
        assert B10.text not in shared and B2.text not in shared
        assert texts[0].index(B10.text) < texts[0].index(A0.text) < texts[0].index(B2.text)


def test_a_cut_budget_drops_the_lowest_ranked_and_keeps_the_numbers(
    model_dir: Path, tmp_path: Path
) -> None:
    gen = generator(model_dir, tmp_path, "stable")
    ranked = [B10, B2, A0]  # best first; A0 sorts first but ranks last
    full = gen.prompts.build("Where?", ranked, 10_000)
    budget = gen.prompts.n_tokens(full) - len(A0.text.encode()) // 2  # room for B10 and B2 only
    text = gen.prompts.build("Where?", ranked, budget)
    assert A0.text not in text  # the lowest-ranked went, not the first in the layout
    assert f"[2] Beta: {B2.text}" in text and f"[3] Beta: {B10.text}" in text
    assert "[1]" not in text  # numbered as the answer lists them: A0 is its first


@pytest.mark.parametrize("order", ["stable", "score"])
def test_the_answer_lists_passages_as_the_prompt_numbers_them(client_factory, order: str) -> None:
    client = client_factory("llama", concat_order=order)
    gen = client.app.state.lorag.service.engine._stepper.host
    prompts: list[str] = []
    build = gen.concat_prompt

    def recorded(row: GenRow) -> list[int]:
        ids = build(row)
        prompts.append(gen.tokenizer.decode(ids))
        return ids

    gen.concat_prompt = recorded
    body = {"question": "Where did Oskar Lindqvist build his clock?", "top_k": 6}
    r = client.post("/ask", json=body)
    assert r.status_code == 200, r.text
    listed = r.json()["passages"]
    scores = [p["score"] for p in listed]
    if order == "stable":
        assert [p["id"] for p in listed] == sorted(p["id"] for p in listed)
        assert scores != sorted(scores, reverse=True)  # the two orders really differ here
    else:
        assert scores == sorted(scores, reverse=True)
    (prompt,) = set(prompts)
    at = [prompt.index(f"[{n}] {p['title']}: {p['text']}") for n, p in enumerate(listed, 1)]
    assert at == sorted(at)  # [1], [2], ... in the prompt are the answer's 1st, 2nd, ...
    # streamed, the passages event lists them in the same order
    with client.stream("POST", "/ask", json={**body, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert [p["id"] for p in json.loads(lines[0][len("data: ") :])] == [p["id"] for p in listed]
