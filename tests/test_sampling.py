"""Sampling in the step batch (temperature, top-p, seed, stop strings), per request.

References: a seeded request's tokens are the same alone and inside a running batch of greedy
and sampled requests under other adapters; the first token's empirical distribution matches
softmax(logits / T) of a direct forward pass, cut to the top-p nucleus by hand (chi-square);
temperature 0 is greedy (every other test of the step batch checks greedy against
transformers).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

import pytest
import torch

from app.contracts import GenRow, Passage, Sampling
from app.errors import InvalidInputError
from app.generation.config import DecodingConfig
from app.generation.generator import Generator, sync_batched_lora
from app.generation.loading import load_generator
from app.generation.modes.base import Answer
from app.generation.step_batch import StepBatch, decode, until_stop, visible
from app.lora.registry import AdapterRegistry
from tests.tiny import BUILDERS, save_lora_adapter

P1 = Passage("a#0", "a", "Alpha", "Alpha is a small town on the river Lek, famous for cheese.")
P2 = Passage("b#0", "b", "Beta", "Beta was founded in 1204 by monks who brewed dark beer there.")


@pytest.fixture(scope="module", params=["t5", "llama"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Generator, list[str]]:
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = BUILDERS[request.param](tmp)
    save_lora_adapter(model_dir, tmp / "adapters" / "a1", seed=1)
    gen = load_generator(str(model_dir), cache_dir=tmp)
    reg = AdapterRegistry(gen, tmp / "adapters", on_change=lambda m: sync_batched_lora(gen, m))
    reg.install("a1", reg.prepare("a1"))
    peft = reg.peft_name("a1")
    assert peft is not None
    return gen, [peft]


@pytest.fixture(scope="module", params=["bart", "llama"])
def spread(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Generator:
    """A generator of each family whose first-token distribution is spread out (the tiny T5's
    puts 0.999 on one token: a chi-square test needs many likely tokens)."""
    tmp = tmp_path_factory.mktemp(request.param)
    return load_generator(str(BUILDERS[request.param](tmp)), cache_dir=tmp)


def run(batch: StepBatch, rows: list[GenRow], join_at: list[int]) -> dict[Hashable, Answer]:
    done: dict[Hashable, Answer] = {}
    step = 0
    while len(done) < len(rows):
        joining = [i for i, t in enumerate(join_at) if t == step]
        done.update(batch.join([rows[i] for i in joining], joining))
        done.update(batch.step())
        step += 1
    return done


def hot(seed: int | None, t: float = 1.5, top_p: float = 0.9) -> Sampling:
    return Sampling(temperature=t, top_p=top_p, seed=seed)


@pytest.mark.parametrize("mode", ["concat", "token", "sequence"])
def test_a_seeded_sample_is_the_same_alone_and_in_a_mixed_batch(world, mode: str) -> None:
    gen, (a1,) = world
    scores = [1.0, 0.5]
    row = GenRow("Where is Alpha?", [P1, P2], a1, 10, mode, scores=scores, sampling=hot(7))  # type: ignore[arg-type]
    alone = decode(gen, [row])[0]
    again = decode(gen, [row])[0]
    other = decode(
        gen, [GenRow(row.question, row.passages, a1, 10, mode, scores=scores, sampling=hot(8))]
    )[0]  # type: ignore[arg-type]
    greedy = decode(gen, [GenRow(row.question, row.passages, a1, 10, mode, scores=scores)])[0]  # type: ignore[arg-type]
    assert alone.ids == again.ids  # the seed reproduces it
    assert alone.ids != other.ids or alone.ids != greedy.ids  # and sampling really samples
    mixed = [
        GenRow("Who founded Beta?", [P2], None, 12),  # greedy, the base
        GenRow("Lek?", [P1], a1, 8, sampling=hot(3)),  # sampled, an adapter
        row,
        GenRow("Beer?", [P2, P1], None, 9, "token", scores=[0.2, 0.1], sampling=hot(None)),
    ]
    done = run(StepBatch(gen), mixed, join_at=[0, 0, 2, 3])
    assert done[2].ids == alone.ids and done[2].text == alone.text
    assert done[2].weights == pytest.approx(alone.weights, abs=1e-5) if alone.weights else True
    assert done[0] == decode(gen, [mixed[0]])[0]  # the greedy row is untouched by the others


def test_temperature_zero_is_greedy(world) -> None:
    gen, _ = world
    row = GenRow("Where is Alpha?", [P1, P2], None, 10)
    cold = GenRow(row.question, row.passages, None, 10, sampling=Sampling(0.0, 0.5, 123))
    assert decode(gen, [cold])[0].ids == decode(gen, [row])[0].ids


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs cut to the smallest set of most likely tokens whose mass reaches top_p, renormed."""
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    keep = order[: int((mass < top_p).sum()) + 1]
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize(("t", "top_p"), [(1.0, 1.0), (2.0, 0.8)])
def test_first_tokens_follow_the_softmax_at_that_temperature_after_top_p(
    spread: Generator, t: float, top_p: float
) -> None:
    gen = spread
    question = "Where is Alpha?"
    row = GenRow(question, [P1], None, 1)
    ids = gen.concat_prompt(row)
    enc = gen._pad([ids])
    inputs = dict(enc)
    if gen.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.full((1, 1), gen.family.start)  # type: ignore[attr-defined]
    logits = gen.forward([None], **inputs).logits[0, -1].float()  # a direct forward pass
    want = _nucleus(torch.softmax(logits / t, -1), top_p)
    n = 3000
    rows = [GenRow(question, [P1], None, 1, sampling=Sampling(t, top_p, seed)) for seed in range(n)]
    batch = StepBatch(gen)
    drawn = Counter(a.ids[0] for _, a in batch.join(rows, list(range(n))))
    support = want.nonzero().squeeze(-1).tolist()
    assert set(drawn) <= set(support)  # nothing outside the nucleus
    expected = torch.tensor([float(want[i]) * n for i in support])
    seen = torch.tensor([float(drawn.get(i, 0)) for i in support])
    # pool the rare tokens so each cell expects >= 5 draws (the chi-square approximation)
    common = expected >= 5
    cells_e = torch.cat([expected[common], expected[~common].sum()[None]])
    cells_o = torch.cat([seen[common], seen[~common].sum()[None]])
    if cells_e[-1] < 5:
        cells_e, cells_o = cells_e[:-1], cells_o[:-1]
    chi2 = float(((cells_o - cells_e) ** 2 / cells_e).sum())
    df = len(cells_e) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(chi2 / 2)))
    assert df >= 3, "the test needs a spread-out distribution"
    assert p_value > 1e-3, (chi2, df, p_value)


def test_a_stop_string_ends_the_answer_and_is_cut_off(spread: Generator) -> None:
    gen = spread
    row = GenRow("Where is Alpha?", [P1, P2], None, 16)
    full = decode(gen, [row])[0]
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    cut = decode(
        gen, [GenRow(row.question, row.passages, None, 16, sampling=Sampling(stop=(stop,)))]
    )[0]
    want = full.text[: full.text.find(stop)].rstrip()
    assert cut.text == want and cut.finish_reason == "stop"
    assert cut.tokens < full.tokens  # it stopped decoding, not only cut the text
    assert full.finish_reason in ("stop", "length")


def test_stop_helpers_hold_back_what_may_become_a_stop() -> None:
    assert until_stop("Juneau. The end", ["."]) == ("Juneau", True)
    assert until_stop("Juneau", ["\n"]) == ("Juneau", False)
    assert visible("The capital is Jun", ["June"]) == "The capital is "
    assert visible("The capital is Juneau. Yes", ["eau."]) == "The capital is Jun"
    assert visible("abc", []) == "abc"


def test_sampling_with_beams_is_refused_by_name(world) -> None:
    gen, _ = world
    row = GenRow("Where is Alpha?", [P1], None, 4, "token", scores=[1.0], sampling=hot(1))
    with pytest.raises(InvalidInputError, match=r"temperature 1\.5"):
        decode(gen, [row], DecodingConfig(num_beams=2))


def test_bad_sampling_values_are_refused_by_name() -> None:
    for bad, needle in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")):
        with pytest.raises(ValueError, match=needle):
            Sampling(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop"):
        Sampling(stop=("",))
