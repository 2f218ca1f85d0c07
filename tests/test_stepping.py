"""Step-level decoding (app/generation/step_batch.py) on tiny T5, BART, llama and GPT-2 models.

The reference for every concat row is the same row generated alone by transformers' greedy
generate() (`Generator.generate_whole`), and for a RAG request the request decoded alone
(`decode`, checked against transformers' RAG classes in test_rag_seq2seq.py): rows that join a
running batch at different steps, leave it as they finish, and run under different adapters
(stacked per-row LoRA and PEFT's adapter_names) must give exactly those tokens, and the same
passage weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from app.contracts import GenRow, Passage
from app.generation.config import DecodingConfig
from app.generation.generator import Generator, sync_batched_lora
from app.generation.kv import GrowingLayer
from app.generation.loading import load_generator
from app.generation.modes.base import Answer
from app.generation.modes.sequence import RagSequence
from app.generation.step_batch import StepBatch, decode
from app.lora.registry import AdapterRegistry
from app.lora.residency import ResidencyPolicy
from tests.tiny import BUILDERS, save_lora_adapter

P1 = Passage("a#0", "a", "Alpha", "Alpha is a small town on the river Lek, famous for cheese.")
P2 = Passage("b#0", "b", "Beta", "Beta was founded in 1204 by monks who brewed dark beer there.")
P3 = Passage("c#0", "c", "", "An untitled passage about gamma rays and their long wavelength.")


@dataclass
class World:
    gen: Generator
    registry: AdapterRegistry
    names: list[str]  # PEFT names of the installed adapters


@pytest.fixture(scope="module", params=list(BUILDERS))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = BUILDERS[request.param](tmp)
    root = tmp / "adapters"
    save_lora_adapter(model_dir, root / "a1", seed=1)
    save_lora_adapter(model_dir, root / "a2", seed=2, r=4)
    gen = load_generator(str(model_dir), cache_dir=tmp)
    registry = AdapterRegistry(gen, root, on_change=lambda m: sync_batched_lora(gen, m))
    names = []
    for name in ("a1", "a2"):
        registry.install(name, registry.prepare(name))
        peft = registry.peft_name(name)
        assert peft is not None
        names.append(peft)
    return World(gen, registry, names)


def workload(names: list[str]) -> list[GenRow]:
    a1, a2 = names
    return [
        GenRow("Where is Alpha?", [P1, P2], None, 12),
        GenRow("Who founded Beta and when was it?", [P2], a1, 5),
        GenRow("gamma?", [P3, P1, P2], a2, 9),
        GenRow("What?", [], None, 1),
        GenRow("Tell me about cheese and beer.", [P1, P2, P3], a1, 16),
        GenRow("Lek?", [P1], a2, 7),
    ]


def alone(gen: Generator, rows: list[GenRow]) -> list[Answer]:
    out = []
    for r in rows:
        d = gen.generate_whole([r])[0]  # transformers' generate()
        out.append(Answer(d.text, None, d.tokens))
    return out


def run(
    batch: StepBatch, rows: list[GenRow], join_at: list[int], widths: list[int] | None = None
) -> dict[Hashable, Answer]:
    """Row i joins before step join_at[i]; step until every row is done (the batch's width at
    each step into widths)."""
    done: dict[Hashable, Answer] = {}
    step = 0
    while len(done) < len(rows):
        joining = [i for i, t in enumerate(join_at) if t == step]
        done.update(batch.join([rows[i] for i in joining], joining))
        if widths is not None:
            widths.append(batch.width)
        done.update(batch.step())
        step += 1
        assert step < 100
    assert len(batch) == 0
    return done


@contextmanager
def lora_path(gen: Generator, stacked: bool) -> Iterator[None]:
    """The stacked per-row LoRA (gen.batched), or PEFT's own adapter_names path."""
    batched = gen.batched
    if not stacked:
        gen.batched = None
    try:
        yield
    finally:
        gen.batched = batched


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "peft"])
def test_rows_joining_and_leaving_answer_as_alone(world: World, stacked: bool) -> None:
    gen = world.gen
    assert gen.cannot_step() is None and StepBatch(gen).cannot_join is None
    with lora_path(gen, stacked):
        rows = workload(world.names)
        want = alone(gen, rows)
        assert len({d.text for d in want}) >= 4  # adapters and questions really differ
        done = run(StepBatch(gen), rows, join_at=[0, 0, 2, 3, 3, 7])
    assert [done[i] for i in range(len(rows))] == want


def test_rows_that_end_early_leave_and_their_slots_are_reused(world: World) -> None:
    gen = world.gen
    rows = workload(world.names)
    batch = StepBatch(gen)
    sizes = []
    done: dict[Hashable, Answer] = {}
    done.update(batch.join(rows[:3], [0, 1, 2]))
    while len(batch):
        sizes.append(len(batch))
        if len(sizes) == 3:
            done.update(batch.join(rows[3:], [3, 4, 5]))
        done.update(batch.step())
    assert sizes[0] == 3 and sizes[-1] == 1  # rows left as they finished
    assert [done[i] for i in range(len(rows))] == alone(gen, rows)


def test_a_dropped_row_leaves_and_the_others_are_unchanged(world: World) -> None:
    gen = world.gen
    rows = workload(world.names)
    batch = StepBatch(gen)
    done: dict[Hashable, Answer] = {}
    done.update(batch.join(rows, list(range(len(rows)))))
    done.update(batch.step())
    batch.drop({4})  # the longest answer's client left
    while len(batch):
        done.update(batch.step())
    assert 4 not in done
    want = alone(gen, rows)
    assert {i: done[i] for i in done} == {i: want[i] for i in done}


def test_a_long_prompt_joining_pads_the_running_rows(world: World) -> None:
    """The joiner's prompt is longer than the running rows' prompt + answer so far: the running
    cache is padded on the left, and nothing changes for anyone."""
    gen = world.gen
    a1, a2 = world.names
    long_q = "Explain everything about " + "Alpha and Beta and gamma " * 8 + "?"
    rows = [
        GenRow("Lek?", [P1], a1, 10),
        GenRow(long_q, [P1, P2, P3], a2, 6),
        GenRow("Beer?", [], None, 8),
    ]
    done = run(StepBatch(gen), rows, join_at=[0, 2, 4])
    assert [done[i] for i in range(3)] == alone(gen, rows)


def merging(kind: str, tmp_path: Path) -> tuple[Generator, AdapterRegistry, str | None]:
    """A generator with one adapter "a" under a registry that merges a single adapter in use,
    and that adapter's PEFT name (unmerged)."""
    model_dir = BUILDERS[kind](tmp_path)
    save_lora_adapter(model_dir, tmp_path / "adapters" / "a", seed=1)
    gen = load_generator(str(model_dir), cache_dir=tmp_path)
    reg = AdapterRegistry(
        gen,
        tmp_path / "adapters",
        policy=ResidencyPolicy(merge_single=True),
        on_change=lambda m: sync_batched_lora(gen, m),
    )
    reg.install("a", reg.prepare("a"))
    return gen, reg, reg.peft_name("a")


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_rows_keep_their_answers_through_a_merge_and_an_unmerge(kind: str, tmp_path: Path) -> None:
    """The merge policy may merge the one adapter into the weights between two steps (rows
    then run as the base, renamed None) and unmerge it again: the answers stay those of the
    unmerged adapter alone."""
    gen, reg, peft = merging(kind, tmp_path)
    rows = [GenRow(q, [P1, P2], peft, 12) for q in ("Where is Alpha?", "Who founded Beta?")]
    want = alone(gen, rows)
    assert want != alone(gen, [GenRow(r.question, r.passages, None, 12) for r in rows])
    batch = StepBatch(gen)
    done = dict(batch.join(rows, [0, 1]))
    done.update(batch.step())
    reg.begin_batch(["a"])  # merged: the plain model serves, rows pass no adapter
    assert reg.merged == "a" and reg.peft_name("a") is None
    batch.rename({0: None, 1: None})
    for _ in range(3):
        done.update(batch.step())
    reg.begin_batch(["a", None])  # a base row arrives: unmerged again
    assert reg.merged is None
    batch.rename({0: peft, 1: peft})
    while len(batch):
        done.update(batch.step())
    assert [done[0], done[1]] == want


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_a_rag_sequence_request_scored_while_merged(kind: str, tmp_path: Path) -> None:
    """The merge policy merges the request's adapter between two steps and it is renamed None:
    its "thorough" scoring pass runs on the merged weights without PEFT's adapter names, and
    the answer is the adapter's (up to the merge's rounding)."""
    gen, reg, peft = merging(kind, tmp_path)
    row = GenRow("Where is Alpha?", [P1, P2, P3], peft, 6, "sequence", scores=[1.0, 0.5, 0.2])
    want = rag_alone(gen, [row])[0]
    base = rag_alone(
        gen, [GenRow(row.question, row.passages, None, 6, "sequence", scores=row.scores)]
    )
    assert want.weights != pytest.approx(base[0].weights, abs=1e-3)  # the adapter matters
    batch = StepBatch(gen)
    done = dict(batch.join([row], [0]))
    done.update(batch.step())
    reg.begin_batch(["a"])
    assert reg.merged == "a"
    batch.rename({0: None})
    while len(batch):
        done.update(batch.step())
    assert (done[0].text, done[0].tokens) == (want.text, want.tokens)
    assert done[0].weights == pytest.approx(want.weights, abs=1e-4)


def test_unsupported_models_are_named(tmp_path: Path) -> None:
    from tests.tiny import tiny_t5

    gen = load_generator(str(tiny_t5(tmp_path)), cache_dir=tmp_path)
    gen.model.generation_config.no_repeat_ngram_size = 3
    why = gen.cannot_step()
    assert why is not None and "NoRepeatNGram" in why
    # its concat rows go through transformers' generate(), which applies the n-gram blocking
    batch = StepBatch(gen)
    assert batch.concat_whole == why
    row = GenRow("Where is Alpha?", [P1, P2], None, 12)
    done = batch.join([row], ["r"])
    assert done == [("r", alone(gen, [row])[0])] and len(batch) == 0
    gen.model.generation_config.no_repeat_ngram_size = 0
    gen.model.config.model_type = "pegasus"
    assert "pegasus" in (StepBatch(gen).cannot_join or "")


def test_decode_state_shrinks_as_rows_leave(world: World) -> None:
    gen = world.gen
    rows = workload(world.names)
    batch = StepBatch(gen)
    batch.join(rows, list(range(len(rows))))
    while len(batch) > 1:
        batch.step()
    state = batch._state
    assert state is not None
    # one row left: no padding column is kept for rows that are gone
    assert bool(state.mask.all())
    assert state.self_layers()[0].keys.shape[0] == 1
    if state.enc_mask is not None:
        assert bool(state.enc_mask[:, -1].all())
    torch.testing.assert_close(state.mask.sum(), torch.tensor(state.mask.numel()))


def test_decoding_steps_append_to_the_cache_in_place(world: World) -> None:
    """A step writes its keys and values into spare columns: no copy of the whole cache (the
    buffers stay the same) until the spare columns run out."""
    gen = world.gen
    batch = StepBatch(gen)
    batch.join([GenRow("Where is Alpha?", [P1, P2], None, 40)], ["r"])
    state = batch._state
    assert state is not None
    layer = state.self_layers()[0]
    buffer = layer._k.data_ptr()  # type: ignore[attr-defined]
    width = state.mask.shape[1]
    for _ in range(5):
        batch.step()
    assert batch._state is state and state.self_layers()[0] is layer
    assert layer._k.data_ptr() == buffer  # type: ignore[attr-defined]
    assert layer.keys is not None and layer.keys.shape[-2] == width + 5


def test_rows_leaving_keep_the_cache_buffer(world: World) -> None:
    """A leave moves the remaining rows inside the buffer and narrows it: no copy of the
    cache; the answers are checked against alone by the leave tests above."""
    gen = world.gen
    batch = StepBatch(gen)
    rows = [GenRow("Where is Alpha?", [P1, P2], None, n) for n in (2, 12, 12)]
    assert batch.join(rows, ["short", "a", "b"]) == [] and len(batch) == 3
    state = batch._state
    assert state is not None
    layer = state.self_layers()[0]
    storage = layer._k.untyped_storage().data_ptr()  # type: ignore[attr-defined]
    while len(batch) == 3:
        batch.step()
    state = batch._state
    assert state is not None and len(batch) == 2
    layer = state.self_layers()[0]
    assert layer.keys is not None and layer.keys.shape[0] == 2
    assert layer._k.untyped_storage().data_ptr() == storage  # type: ignore[attr-defined]


def test_rows_joining_go_into_the_buffers_spare_rows(world: World) -> None:
    """A join writes the joiners into spare rows of the running rows' buffer (no copy of the
    running rows); the answers are checked against alone by the join tests above."""
    gen = world.gen
    batch = StepBatch(gen)
    first = [GenRow("Where is Alpha?", [P1, P2], None, 12)]
    assert batch.join(first, ["a"]) == []
    batch.step()
    state = batch._state
    assert state is not None
    storage = state.self_layers()[0]._k.untyped_storage().data_ptr()  # type: ignore[attr-defined]
    assert batch.join([GenRow("Where is Beta?", [P2], None, 12)], ["b"]) == []
    state = batch._state
    assert state is not None and len(batch) == 2
    layer = state.self_layers()[0]
    assert layer.keys is not None and layer.keys.shape[0] == 2
    assert layer._k.untyped_storage().data_ptr() == storage  # type: ignore[attr-defined]


def test_rows_outlasting_the_buffers_room_then_joins_and_leaves_answer_as_alone(
    world: World,
) -> None:
    """A row that decodes past the room the buffer had (a step rebuilds it, in inference
    mode), with rows joining into its spare rows and leaving after that: answers as alone."""
    a1, a2 = world.names
    rows = [
        GenRow("Where is Alpha?", [P1, P2], None, 90),
        GenRow("Who founded Beta and when was it?", [P2], a1, 5),
        GenRow("gamma?", [P3, P1, P2], a2, 9),
        GenRow("Tell me about cheese and beer.", [P1, P2, P3], a1, 16),
        GenRow("Lek?", [P1], a2, 7),
    ]
    done = run(StepBatch(world.gen), rows, join_at=[0, 10, 70, 72, 80])
    assert [done[i] for i in range(len(rows))] == alone(world.gen, rows)
    assert done[0].tokens > GrowingLayer.SPARE + 10  # it outlasted the room


def test_transformers_concatenating_caches_give_the_same_answers(world: World) -> None:
    """The benchmark's comparison variant (in_place_cache=False) decodes the same tokens."""
    gen = world.gen
    rows = workload(world.names)
    done = run(StepBatch(gen, in_place_cache=False), rows, join_at=[0, 1, 1, 2, 5, 5])
    assert [done[i] for i in range(len(rows))] == alone(gen, rows)


def token_workload(names: list[str]) -> list[GenRow]:
    """RAG-Token requests (scores: the retrieval prior's logits) mixed with concat rows."""
    a1, a2 = names

    def token(q: str, passages: list[Passage], adapter: str | None, n: int, scores: list[float]):
        return GenRow(q, passages, adapter, n, "token", scores=scores)

    return [
        token("Where is Alpha?", [P1, P2], None, 12, [2.0, 1.0]),
        GenRow("Who founded Beta and when was it?", [P2], a1, 5),
        token("gamma?", [P3, P1, P2], a2, 9, [0.5, 0.4, 3.0]),
        token("Lek?", [P1], a1, 7, [1.0]),
        token("What?", [], None, 4, []),
        token("Tell me about cheese and beer.", [P1, P2, P3], a1, 16, [1.0, 1.0, 1.0]),
    ]


def rag_alone(gen: Generator, rows: list[GenRow], min_prior: float | None = None) -> list[Answer]:
    return [decode(gen, [r], DecodingConfig(min_prior=min_prior))[0] for r in rows]


def reference(gen: Generator, rows: list[GenRow], **decoding: Any) -> list[Answer]:
    """Each row alone: concat through transformers' generate(), a RAG request decoded alone."""
    config = DecodingConfig(**decoding)
    return [alone(gen, [r])[0] if r.mode == "concat" else decode(gen, [r], config)[0] for r in rows]


def same_answers(got: list[Answer], want: list[Answer]) -> None:
    assert [(a.text, a.tokens) for a in got] == [(a.text, a.tokens) for a in want]
    for a, b in zip(got, want, strict=True):
        assert (a.weights is None) == (b.weights is None)
        if a.weights is not None and b.weights is not None:
            assert a.weights == pytest.approx(b.weights, abs=1e-6)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "peft"])
def test_rag_token_requests_step_as_alone(world: World, stacked: bool) -> None:
    """RAG-Token requests (a row per passage, marginalized at each step) join and leave a
    running batch among concat rows, and answer exactly as each decoded alone:
    tokens, and p(z|x,y) over the request's own tokens."""
    gen = world.gen
    widths: list[int] = []
    with lora_path(gen, stacked):
        rows = token_workload(world.names)
        want = reference(gen, rows)
        assert len({a.text for a in want}) >= 4
        for a, r in zip(want, rows, strict=True):
            assert a.weights is None or len(a.weights) == len(r.passages)
        done = run(StepBatch(gen), rows, [0, 0, 2, 3, 3, 5], widths)
    same_answers([done[i] for i in range(len(rows))], want)
    assert max(widths) >= 6  # token requests took a row per passage


def test_rag_token_pruning_matches_the_decoder(world: World) -> None:
    """With min_prior, a request decodes only its kept passages; pruned ones weigh 0."""
    gen = world.gen
    rows = [
        GenRow("gamma?", [P3, P1, P2], world.names[1], 9, "token", scores=[0.0, 0.1, 6.0]),
        GenRow("Where is Alpha?", [P1, P2, P3], None, 12, "token", scores=[3.0, 2.9, -4.0]),
    ]
    want = rag_alone(gen, rows, min_prior=0.05)
    assert want[0].weights is not None and want[0].weights[:2] == [0.0, 0.0]
    batch = StepBatch(gen, DecodingConfig(min_prior=0.05))
    done = run(batch, rows, join_at=[0, 1])
    same_answers([done[0], done[1]], want)


def test_rag_token_requests_of_different_lengths_share_a_call_as_alone(world: World) -> None:
    """Greedy RAG-Token requests of any max_new_tokens decoded as one batch: each gets its own
    tokens and its weights over its own tokens only (not the batch's longest)."""
    gen = world.gen
    rows = [
        GenRow("Tell me about cheese and beer.", [P1, P2, P3], None, 3, "token", scores=[1, 1, 1]),
        GenRow("gamma?", [P3, P1, P2], None, 16, "token", scores=[0.5, 0.4, 3.0]),
    ]
    together = decode(gen, rows)
    same_answers(together, rag_alone(gen, rows))


@pytest.mark.parametrize(("beams", "in_place"), [(2, True), (3, True), (2, False)])
def test_rag_token_beam_search_steps_as_alone(world: World, beams: int, in_place: bool) -> None:
    """RAG-Token with beams: each request's beam search advances a step at a time in the
    running batch (its rows reordered and grown as beams fork), beside concat rows and greedy
    nothing else; answers and weights equal the request decoded alone (num_beams), pruning
    included."""
    gen = world.gen
    a1, a2 = world.names
    rows = [
        GenRow("Where is Alpha?", [P1, P2], None, 8, "token", scores=[2.0, 1.0]),
        GenRow("Who founded Beta and when was it?", [P2], a1, 5),
        GenRow("gamma?", [P3, P1, P2], a2, 9, "token", scores=[0.5, 0.4, 3.0]),
        GenRow("Cheese?", [P1, P2, P3], a1, 6, "token", scores=[3.0, 2.9, -4.0]),
    ]
    want = reference(gen, rows, num_beams=beams, min_prior=0.05)
    batch = StepBatch(gen, DecodingConfig(beams, 0.05), in_place_cache=in_place)
    assert batch.rows_for("token", 3) == 3 * beams
    widths: list[int] = []
    done = run(batch, rows, [0, 0, 1, 3], widths)
    same_answers([done[i] for i in range(len(rows))], want)
    assert max(widths) > 2 + 1 + 3  # beams forked rows


@pytest.mark.parametrize("beams", [2, 3])
def test_rag_sequence_beam_search_steps_as_alone(
    world: World, beams: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAG-Sequence with beams: each kept passage runs its own beam search in the batch (its
    rows its open beams, leaving when it closes); then every passage's beams are marginalized
    ("thorough" and "fast"): answers and weights equal the request decoded alone (num_beams)."""
    gen = world.gen
    a1, a2 = world.names
    rows = [
        GenRow("Where is Alpha?", [P1, P2], None, 7, "sequence", scores=[2.0, 1.0]),
        GenRow("Who founded Beta and when was it?", [P2], a1, 5),
        GenRow("gamma?", [P3, P1, P2], a2, 6, "sequence", "fast", [0.5, 0.4, 3.0]),
        GenRow("Cheese?", [P1, P2, P3], a1, 5, "sequence", scores=[3.0, 2.9, -4.0]),
    ]
    want = reference(gen, rows, num_beams=beams, min_prior=0.05)
    batch = StepBatch(gen, DecodingConfig(beams, 0.05))
    ranked: list[tuple[int, ...]] = []
    real = RagSequence._marginalize

    def spy(self, hyps):  # what is marginalized: N per passage
        ranked.append(tuple(hyps.sequences.shape[:2]))
        return real(self, hyps)

    monkeypatch.setattr(RagSequence, "_marginalize", spy)
    done = run(batch, rows, join_at=[0, 0, 1, 3])
    same_answers([done[i] for i in range(len(rows))], want)
    assert sorted(ranked) == sorted([(2, beams), (3, beams), (2, beams)])  # kept passages x N


def test_rows_of_unknown_modes_are_refused_by_name(world: World) -> None:
    batch = StepBatch(world.gen)
    with pytest.raises(ValueError, match="'beam'"):
        batch.join([GenRow("Lek?", [P1], None, 3, "beam", scores=[1.0])], ["k"])  # type: ignore[arg-type]
    assert len(batch) == 0


def sequence_workload(names: list[str]) -> list[GenRow]:
    """RAG-Sequence requests ("thorough" and "fast") among RAG-Token and concat ones."""
    a1, a2 = names

    def seq(q, passages, adapter, n, scores, decoding="thorough"):
        return GenRow(q, passages, adapter, n, "sequence", decoding, scores)

    return [  # a thorough request joins after other rows: its encoder states are not the first
        GenRow("Who founded Beta and when was it?", [P2], a1, 5),
        seq("Where is Alpha?", [P1, P2], None, 12, [2.0, 1.0]),
        seq("gamma?", [P3, P1, P2], a2, 9, [0.5, 0.4, 3.0], "fast"),
        GenRow("Lek?", [P1], a2, 7, "token", scores=[1.0]),
        seq("What?", [], None, 4, []),
        seq("Tell me about cheese and beer.", [P1, P2, P3], a1, 16, [1.0, 1.0, 1.0]),
        seq("Beer?", [P2, P3], a2, 6, [0.3, 0.1], "fast"),
    ]


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "peft"])
def test_rag_sequence_requests_step_as_alone(world: World, stacked: bool) -> None:
    """RAG-Sequence requests decode a hypothesis per passage in the running batch (each row
    leaving when its hypothesis ends) and are marginalized when the last ends: answers and
    p(z|x,y) equal the request decoded alone, "thorough" (rescored under every passage) and
    "fast"."""
    gen = world.gen
    with lora_path(gen, stacked):
        rows = sequence_workload(world.names)
        want = reference(gen, rows)
        assert len({a.text for a in want}) >= 4
        done = run(StepBatch(gen), rows, join_at=[0, 0, 1, 2, 3, 2, 6])
    same_answers([done[i] for i in range(len(rows))], want)


def test_rag_sequence_rows_leave_as_their_hypotheses_end(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passage whose hypothesis ended leaves the batch before the request's others. Tiny
    random models never emit their end token, so the end token here is one the first
    passage's hypothesis emits at a later step (its third or after) that no hypothesis
    emitted before it, and that some other hypothesis does not emit at the same step (for
    the reference alike)."""
    gen = world.gen
    row = GenRow("Where is Alpha?", [P1, P2, P3], None, 12, "sequence", scores=[1.0, 1.0, 1.0])
    probe = StepBatch(gen)
    probe.join([row], ["p"])
    hyps = probe._requests[0]
    assert isinstance(hyps, RagSequence)
    for _ in range(6):
        probe.step()
    ends = [
        token
        for j, token in enumerate(hyps.ids[0][2:7], start=2)
        if all(token not in ids[:j] for ids in hyps.ids)
        and any(ids[j] != token for ids in hyps.ids[1:])
    ]
    assert ends, hyps.ids
    eos = ends[0]
    monkeypatch.setattr(gen, "rag_eos", eos)  # for the reference alike
    batch = StepBatch(gen)
    widths = []
    done = dict(batch.join([row], ["s"]))
    while len(batch):
        widths.append(batch.width)
        done.update(batch.step())
    same_answers([done["s"]], rag_alone(gen, [row]))
    assert min(widths) < 3 and widths == sorted(widths, reverse=True)
    assert len(widths) >= 3


def test_rag_sequence_pruning_matches_the_decoder(world: World) -> None:
    gen = world.gen
    rows = [
        GenRow("gamma?", [P3, P1, P2], world.names[1], 9, "sequence", scores=[0.0, 0.1, 6.0]),
        GenRow("Alpha?", [P1, P2, P3], None, 12, "sequence", "fast", [3.0, 2.9, -4.0]),
    ]
    want = rag_alone(gen, rows, min_prior=0.05)
    assert want[0].weights is not None and want[0].weights[:2] == [0.0, 0.0]
    done = run(StepBatch(gen, DecodingConfig(min_prior=0.05)), rows, join_at=[0, 1])
    same_answers([done[0], done[1]], want)
