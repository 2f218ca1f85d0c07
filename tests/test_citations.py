"""The citation check: a mark [n] names a passage that holds what it cites, in whole answers
and in streamed ones; and, through the real app with the shipped `cited` adapter, the mark it
gets wrong is moved."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from app.generation.citations import CitationCheck
from tests.test_streaming import events

ALASKA = ("Alaska", "Juneau is the capital of Alaska, a state in the far north.")
FRANCE = ("France", "Paris is the capital and largest city of France.")
RIVERS = ("Rivers", "The Yukon River flows through Alaska and Canada.")


def test_a_mark_whose_passage_lacks_the_claim_names_the_passage_that_holds_it() -> None:
    check = CitationCheck([ALASKA, FRANCE, RIVERS], [0.9, 0.8, 0.7])
    moved = check("Juneau [2].")
    assert (moved.text, moved.moved) == ("Juneau [1].", 1)
    assert check("Juneau [1].").moved == 0
    assert check("Juneau [4].").text == "Juneau [1]."  # a number no passage has


def test_a_mark_holding_half_of_its_claim_stands_and_an_unsupported_claim_keeps_its_mark() -> None:
    check = CitationCheck([ALASKA, FRANCE, RIVERS], [0.9, 0.8, 0.7])
    # [3] holds "Alaska" and "Yukon" of the four words, half: it stands, though [1] holds three
    assert check("Juneau, capital, Alaska, Yukon [3].").moved == 0
    # [3] holds one of the three words, [2] holds two: more than half elsewhere, so it moves
    assert check("Paris capital Yukon [3].").text == "Paris capital Yukon [2]."
    # nothing holds "Tokyo": the generator's mark stands, whatever it is
    assert check("Tokyo [2].").text == "Tokyo [2]."
    assert check("No marks here.").text == "No marks here."


def test_ties_go_to_the_higher_retrieval_score() -> None:
    twin = ("Capitals", "Juneau is a capital.")
    assert check_text([ALASKA, twin, FRANCE], [0.5, 0.9, 0.8], "Juneau [3].") == "Juneau [2]."
    assert check_text([ALASKA, twin, FRANCE], [0.9, 0.5, 0.8], "Juneau [3].") == "Juneau [1]."


def test_each_mark_checks_its_own_claim_and_marks_side_by_side_share_one() -> None:
    check = CitationCheck([ALASKA, FRANCE, RIVERS], [0.9, 0.8, 0.7])
    answer = "Juneau is in the north [2]. Paris is the largest city [1]."
    checked = check(answer)
    assert checked.text == "Juneau is in the north [1]. Paris is the largest city [2]."
    assert checked.moved == 2
    # the second sentence's claim is its own, not the first's
    assert check("Juneau is the capital [1]. The Yukon River [1].").text == (
        "Juneau is the capital [1]. The Yukon River [3]."
    )
    # two marks that come to name one passage become one
    assert check("Paris, largest city [3][1].").text == "Paris, largest city [2]."
    assert check("Paris, largest city [2] [3].").text == "Paris, largest city [2]."


def test_a_streamed_answer_grows_into_the_checked_answer() -> None:
    check = CitationCheck([ALASKA, FRANCE, RIVERS], [0.9, 0.8, 0.7])
    answer = "Juneau is in the north [2]. Paris [12] [2] and the Yukon River [3]."
    final = check(answer).text
    assert final == "Juneau is in the north [1]. Paris [2] and the Yukon River [3]."
    shown = [check(answer[:i], final=False).text for i in range(len(answer) + 1)]
    for before, after in itertools.pairwise(shown):
        assert after.startswith(before)  # what was streamed is never taken back
    assert all(final.startswith(s) for s in shown)
    # a mark still being written waits for its end
    assert check("Juneau [", final=False).text == "Juneau"
    assert check("Juneau [2", final=False).text == "Juneau"
    assert check("Juneau [2]", final=False).text == "Juneau [1]"


def check_text(passages: list[tuple[str, str]], scores: list[float], answer: str) -> str:
    return CitationCheck(passages, scores)(answer).text


@pytest.mark.slow
def test_the_shipped_cited_adapter_gets_its_mark_moved_through_the_real_app(
    tmp_path: Path,
) -> None:
    """SmolLM2-135M-Instruct with the shipped `cited` adapter, asked "What is Anarchism?" over
    the five passages the demo index returns for it, answers "A radical left-wing ideology
    [2]." (bench/RESULTS.md, "The citation check"); the words are passage 3's."""
    import openai
    from fastapi.testclient import TestClient

    from app.generation.loading import prepare_default_generator
    from app.main import create_app
    from app.retrieval.builder import build_index
    from app.retrieval.encoders import load_encoder
    from app.settings import Settings
    from tests.conftest import wait_loaded

    source = Path(__file__).parent / "data" / "anarchism.jsonl"
    build_index(
        [source], load_encoder("default", "sentence-transformers"), tmp_path / "index" / "a"
    )
    adapters = tmp_path / "adapters"
    shutil.copytree(Path(__file__).parents[1] / "adapters" / "cited", adapters / "cited")
    question = {"question": "What is Anarchism?", "adapter": "cited", "max_new_tokens": 24}

    def serve(check: bool) -> TestClient:
        settings = Settings(
            generator=str(prepare_default_generator(Settings().cache_dir)),
            index_dir=tmp_path / "index",
            index_name="a",
            adapters_dir=adapters,
            lazy_load_adapters=True,
            check_citations=check,
            top_k=5,
        )
        client = TestClient(create_app(settings))
        client.__enter__()
        wait_loaded(client)
        return client

    plain = serve(check=False)
    try:
        unchecked = plain.post("/ask", json=question).json()
    finally:
        plain.__exit__(None, None, None)
    texts = [p["text"] for p in unchecked["passages"]]
    # the scenario: the generator's mark names a passage without the words it cites
    assert unchecked["answer"].endswith("[2].") and unchecked["citations_moved"] == 0
    assert "left-wing" not in texts[1] and "left-wing" in texts[2]

    client = serve(check=True)
    try:
        checked = client.post("/ask", json=question).json()
        assert checked["answer"] == unchecked["answer"].replace("[2]", "[3]")
        assert checked["citations_moved"] == 1
        # streamed: the pieces join into the checked answer, the wrong mark never sent
        streamed = events(client, {**question, "stream": True})
        pieces = [data["text"] for kind, data in streamed if kind == "token"]
        done = streamed[-1][1]
        assert streamed[-1][0] == "done" and done["answer"] == checked["answer"]
        assert "".join(pieces).strip() == checked["answer"] and "[2]" not in "".join(pieces)
        # OpenAI's API, through the official client: the same answer, the same count
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=client)
        chat = sdk.chat.completions.create(
            model="cited",
            messages=[{"role": "user", "content": question["question"]}],
            temperature=0,
            max_tokens=24,
            extra_body={"top_k": 5, "mode": "concat"},
        )
        assert chat.choices[0].message.content == checked["answer"]
        assert (chat.model_extra or {})["citations_moved"] == 1
        metrics = client.get("/metrics").text
        assert 'lorag_citations_moved_total{adapter="cited",mode="concat"} 3.0' in metrics
    finally:
        client.__exit__(None, None, None)
