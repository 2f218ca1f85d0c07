"""Generator backends on tiny T5, BART and llama models (and llama with a chat template).

The reference for a batched row is the same row generated alone; for the greedy decode it is
transformers' own generate on the same input ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.contracts import GenRow, Passage
from app.errors import AdapterNotFound
from app.generation.causal import Causal
from app.generation.generator import Generator
from app.generation.loading import load_generator
from app.generation.seq2seq import Seq2Seq
from app.generation.step_batch import decode, pad
from tests.tiny import BUILDERS, load_tiny, tiny_llama

P1 = Passage("a#0", "a", "Alpha", "Alpha is a small town on the river Lek, famous for cheese.")
P2 = Passage("b#0", "b", "Beta", "Beta was founded in 1204 by monks who brewed dark beer there.")
P3 = Passage("c#0", "c", "", "An untitled passage about gamma rays and their long wavelength.")


@pytest.fixture(scope="module", params=list(BUILDERS))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture()
def gen(model_dir: Path, tmp_path: Path) -> Generator:
    return load_generator(str(model_dir), cache_dir=tmp_path)


def rows() -> list[GenRow]:
    return [
        GenRow("Where is Alpha?", [P1, P2], None, 12),
        GenRow("Who founded Beta and when was it?", [P2], None, 5),
        GenRow("gamma?", [P3, P1, P2], None, 9),
        GenRow("What?", [], None, 1),
    ]


def test_backend_follows_config(gen: Generator, model_dir: Path) -> None:
    want = Seq2Seq if "t5" in model_dir.name or "bart" in model_dir.name else Causal
    assert isinstance(gen.family, want)
    assert gen.kind == ("causal" if want is Causal else "seq2seq")
    assert not gen.model.training
    assert gen.tokenizer.pad_token is not None
    assert gen.tokenizer.padding_side == ("left" if gen.kind == "causal" else "right")


def test_batched_rows_equal_rows_alone(gen: Generator) -> None:
    batch = rows()
    together = gen.generate(batch)
    alone = [gen.generate([r])[0] for r in batch]
    assert together == alone
    # the rows really differ, and padding really happened (prompts of different lengths)
    assert len(set(together[:3])) == 3
    enc = gen._encode([gen.prompt(r.question, r.passages, 12) for r in batch], 10_000)
    assert int(enc["attention_mask"].sum(1).min()) < enc["input_ids"].shape[1]


def test_greedy_matches_transformers_generate(gen: Generator, model_dir: Path) -> None:
    ref = load_tiny(model_dir)
    row = rows()[0]
    enc = gen._encode([gen.prompt(row.question, row.passages, 12)], 10_000)
    out = ref.generate(**enc, max_new_tokens=12, do_sample=False, num_beams=1)
    start = 1 if gen.kind == "seq2seq" else enc["input_ids"].shape[1]
    assert gen.generate([row]) == [gen._decode(out[0, start:])]
    assert gen.generate([row])[0] != ""


def test_token_counts_are_the_tokens_generate_produced(gen: Generator, model_dir: Path) -> None:
    """An answer counts the row's generated tokens up to and including its end token."""
    ref = load_tiny(model_dir)
    for row in rows():
        n = row.max_new_tokens
        enc = gen._encode([gen.prompt(row.question, row.passages, n)], 10_000)
        out = ref.generate(**enc, max_new_tokens=n, do_sample=False, num_beams=1)
        start = 1 if gen.kind == "seq2seq" else enc["input_ids"].shape[1]
        new = out[0, start:].tolist()
        ends = [i for i, t in enumerate(new) if t in gen.eos_ids]
        expected = ends[0] + 1 if ends else len(new)
        [decoded] = decode(gen, [row])
        assert decoded.tokens == expected
        assert 0 < decoded.tokens <= n


def test_each_row_is_cut_at_its_own_limit(gen: Generator) -> None:
    long_row = GenRow("Where is Alpha?", [P1], None, 12)
    short = GenRow("Where is Alpha?", [P1], None, 3)
    full, cut = gen.generate([long_row, short])
    n = len(gen.tokenizer(cut, add_special_tokens=False)["input_ids"])
    assert n <= 3
    assert full.startswith(cut)  # greedy is prefix-consistent


def test_prompt_numbers_passages_with_titles(gen: Generator) -> None:
    text = gen.prompt("Where is Alpha?", [P1, P3], 8)
    # each passage opens and closes with its number, the mark a citation repeats
    assert f"[1] Alpha: {P1.text} [1]" in text
    assert f"[2] {P3.text} [2]" in text
    assert "Where is Alpha?" in text
    if gen.kind == "seq2seq":
        assert text.startswith("question: Where is Alpha? context: [1]")
    elif gen.prompts.chat:
        assert text.startswith("<system>") and text.endswith("<assistant>")
    else:
        assert text.endswith("Answer:")


def test_long_passages_are_cut_to_the_context_window(gen: Generator) -> None:
    gen.tokenizer.model_max_length = 420
    long = Passage("d#0", "d", "Delta", "delta " * 400)
    text = gen.prompt("Where is Delta?", [P1, long, P2], 40)
    budget = gen.max_input_tokens(40)
    assert gen.prompts.n_tokens(text) <= budget
    assert "[1] Alpha" in text and "[2] Delta: delta delta" in text
    assert text.count("[2]") == 2  # the cut passage still closes with its number
    assert "[3]" not in text  # passages after the cut one are dropped
    # the answer still comes: the prompt's end (question, answer cue) survived
    assert "Where is Delta?" in text
    (answer,) = gen.generate([GenRow("Where is Delta?", [P1, long, P2], None, 40)])
    assert isinstance(answer, str)


def test_passage_prompts_one_padded_row_per_passage(gen: Generator) -> None:
    prompts = gen.passage_prompts("Where is Alpha?", [P1, P2, P3])
    assert len(prompts) == 3 and len({len(p) for p in prompts}) > 1
    left = gen.family.padding_side == "left"
    ids, mask = pad(prompts, gen.pad_id, left=left, device=gen.device)
    for i, p in enumerate([P1, P2, P3]):
        alone = gen.passage_prompts("Where is Alpha?", [p])[0]
        assert ids[i][mask[i].bool()].tolist() == alone == prompts[i]
    pad_col = 0 if gen.kind == "causal" else -1  # left padding for causal, right for seq2seq
    assert int(mask[:, pad_col].min()) == 0


def test_unknown_adapter_is_refused(gen: Generator) -> None:
    with pytest.raises(AdapterNotFound, match="'nope'"):
        gen.generate([GenRow("q", [P1], "nope", 3)])
    assert gen.adapter_kwargs([None, None]) == {}


def test_empty_batch(gen: Generator) -> None:
    assert gen.generate([]) == []


def test_batch_that_would_overrun_the_window_is_split(gen: Generator) -> None:
    if gen.kind == "seq2seq":
        assert gen._groups([900, 10], [500, 1]) == [[0, 1]]  # the answer is not in the window
        return
    gen.tokenizer.model_max_length = 420
    long = Passage("d#0", "d", "Delta", "delta " * 400)
    batch = [GenRow("Where is Delta?", [long], None, 4), GenRow("Delta?", [long], None, 60)]
    lengths = [
        gen.prompts.n_tokens(gen.prompt(r.question, r.passages, r.max_new_tokens)) for r in batch
    ]
    assert lengths[0] + 60 > 420  # together they would not fit ...
    assert gen._groups(lengths, [4, 60]) == [[0], [1]]  # ... so they run apart
    assert gen._groups([100, 90, 80], [4, 60, 4]) == [[0, 1, 2]]
    assert gen.generate(batch) == [gen.generate([r])[0] for r in batch]


def test_chat_template_without_system_turn(tmp_path: Path) -> None:
    gen = load_generator(str(tiny_llama(tmp_path, chat=True)), cache_dir=tmp_path)
    gen.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    )
    text = gen.prompt("Where is Alpha?", [P1], 8)
    assert text.startswith("<user>Answer the question") and "[1] Alpha" in text
