"""The prompt-prefix KV cache (app/generation/prefix_cache.py) in the step batch.

Reference: the same requests with the cache off. With it on, every answer's tokens and passage
weights are the same, for concat, RAG-Token and RAG-Sequence rows, greedy and sampled, rows
joining a running batch at different steps, under adapters, across a hot swap of an adapter
(its old keys and values never serve) and with blocks evicted mid-run; and the cache really
serves (reused tokens counted per answer).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.contracts import GenRow, Passage, Sampling
from app.generation.config import DecodingConfig
from app.generation.generator import Generator, sync_batched_lora
from app.generation.loading import load_generator
from app.generation.modes.base import Answer
from app.generation.prefix_cache import BLOCK, PrefixCache
from app.generation.step_batch import StepBatch
from app.lora.registry import AdapterRegistry
from tests.tiny import BUILDERS, save_lora_adapter

P1 = Passage("a#0", "a", "Alpha", "Alpha is a small town on the river Lek, famous for cheese.")
P2 = Passage("b#0", "b", "Beta", "Beta was founded in 1204 by monks who brewed dark beer there.")
P3 = Passage("c#0", "c", "", "An untitled passage about gamma rays and their long wavelength.")
ON = DecodingConfig(prefix_cache_bytes=64 * 1024 * 1024)


def setup(kind: str, tmp: Path, dtype: str = "float32") -> tuple[Generator, AdapterRegistry, str]:
    model_dir = BUILDERS[kind](tmp)
    save_lora_adapter(model_dir, tmp / "adapters" / "a1", seed=1)
    save_lora_adapter(model_dir, tmp / "adapters" / "a2", seed=2)
    gen = load_generator(str(model_dir), cache_dir=tmp, dtype=dtype)
    reg = AdapterRegistry(gen, tmp / "adapters", on_change=lambda m: sync_batched_lora(gen, m))
    reg.install("a1", reg.prepare("a1"))
    peft = reg.peft_name("a1")
    assert peft is not None
    return gen, reg, peft


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-chat", "llama-bfloat16"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny generator of each kind; llama-bfloat16: LORAG_DTYPE=bfloat16 (prefill about twice
    as fast on CPUs with AVX512-BF16: bench/RESULTS.md, "bfloat16"), whose cached keys and
    values stay in the model's dtype."""
    kind = request.param.removesuffix("-bfloat16")
    dtype = "float32" if kind == request.param else "bfloat16"
    return setup(kind, tmp_path_factory.mktemp(request.param), dtype)


def workload(a1: str) -> list[GenRow]:
    """Requests that share prefixes: the same passages under other questions, a repeated
    question, RAG rows whose prompt is one passage then the question."""
    hot = Sampling(temperature=1.2, top_p=0.9, seed=5)
    return [
        GenRow("Where is Alpha?", [P1, P2], None, 8),
        GenRow("Where is Alpha?", [P1, P2], None, 8),  # a repeat: all but the last block
        GenRow("Who founded Beta?", [P1, P2], a1, 6),  # same passages, another question
        GenRow("gamma?", [P3, P1], None, 6, "token", scores=[1.0, 0.5]),
        GenRow("cheese?", [P3, P1], None, 6, "token", scores=[0.2, 0.9]),  # same passages
        GenRow("Lek?", [P1, P2], a1, 5, "sequence", scores=[1.0, 1.0]),
        GenRow("Lek?", [P1, P2], a1, 7, sampling=hot),
    ]


def run(batch: StepBatch, rows: list[GenRow], join_at: list[int]) -> dict[Hashable, Answer]:
    done: dict[Hashable, Answer] = {}
    step = 0
    while len(done) < len(rows):
        joining = [i for i, t in enumerate(join_at) if t == step]
        done.update(batch.join([rows[i] for i in joining], joining))
        done.update(batch.step())
        step += 1
    return done


def same(got: Answer, want: Answer) -> None:
    assert (got.ids, got.text, got.tokens) == (want.ids, want.text, want.tokens)
    if want.weights is not None:
        assert got.weights == pytest.approx(want.weights, abs=1e-5)


def test_answers_equal_the_cache_off_and_the_cache_serves(world) -> None:
    gen, _, a1 = world
    rows = workload(a1)
    join_at = [0, 2, 2, 3, 5, 6, 6]
    want = run(StepBatch(gen), rows, join_at)
    batch = StepBatch(gen, ON)
    assert batch.prefixes is not None
    got = run(batch, rows, join_at)
    for i in range(len(rows)):
        same(got[i], want[i])
    assert got[0].reused_tokens == 0  # nothing cached yet
    prompt = got[1].prompt_tokens
    assert got[1].reused_tokens == (prompt - 1) // BLOCK * BLOCK  # the repeat: every full block
    assert got[2].reused_tokens == 0  # another adapter's keys and values are other numbers
    assert got[4].reused_tokens > 0 and got[6].reused_tokens > 0  # same passages, adapter
    assert batch.prefixes.stats.reused == sum(a.reused_tokens for a in got.values())
    again = run(batch, rows, [0] * len(rows))  # all at once, everything cached now
    for i in range(len(rows)):
        same(again[i], want[i])
        assert again[i].reused_tokens > 0
    held = batch.prefixes.lookup(None, gen.concat_prompt(rows[0]))
    assert held and held[0][0].dtype == next(gen.model.parameters()).dtype


def test_joiners_that_share_a_prefix_compute_it_once(world, monkeypatch) -> None:
    """Rows arriving together: a repeat of an earlier joiner's prompt waits for a second
    prefill call and reuses the blocks the first call computed, with the same answers."""
    gen, _, a1 = world
    rows = workload(a1)
    want = run(StepBatch(gen), rows, [0] * len(rows))
    monkeypatch.setattr("app.generation.step_batch.CALL_COST_TOKENS", BLOCK)
    batch = StepBatch(gen, ON)  # a cold cache: nothing is cached before this one join
    got = run(batch, rows, [0] * len(rows))
    for i in range(len(rows)):
        same(got[i], want[i])
    assert got[0].reused_tokens == 0
    assert got[1].reused_tokens == (got[1].prompt_tokens - 1) // BLOCK * BLOCK
    assert got[2].reused_tokens == 0  # another adapter
    assert got[6].reused_tokens > 0  # the passages row 5 (same adapter) computes


def test_a_hot_swap_never_serves_the_old_weights_and_keeps_the_others(tmp_path: Path) -> None:
    """Entries are keyed by the PEFT name a row runs under, which the registry never reuses:
    the swapped adapter's new version reuses nothing of the old one's, while the base's
    blocks, computed before the swap, still serve after it (the cache is not emptied)."""
    gen, reg, a1 = setup("llama", tmp_path)
    row = GenRow("Where is Alpha?", [P1, P2], a1, 8)
    base = GenRow("Where is Alpha?", [P1, P2], None, 8)
    batch = StepBatch(gen, ON)
    first = run(batch, [row, base], [0, 0])[0]
    assert batch.prefixes is not None and len(batch.prefixes) > 0
    reg.install("a1", reg.prepare("a2"))  # same name, other weights
    swapped = reg.peft_name("a1")
    assert swapped is not None and swapped != a1
    new_row = GenRow(row.question, row.passages, swapped, 8)
    got = run(batch, [new_row, base], [0, 0])
    want = run(StepBatch(gen), [new_row, base], [0, 0])
    same(got[0], want[0])
    same(got[1], want[1])
    assert got[0].reused_tokens == 0 and batch.prefixes.stats.clears == 0
    assert got[1].reused_tokens > 0  # the base's blocks outlived the swap
    assert got[0].ids != first.ids or got[0].text != first.text  # the weights really changed


def test_a_merge_and_an_unmerge_empty_the_cache(tmp_path: Path) -> None:
    """While an adapter is merged the base's name serves it, and an unmerge puts the base
    weights back only within rounding: each empties the cache, and answers stay exact."""
    gen, reg, a1 = setup("llama", tmp_path)
    reg.policy = replace(reg.policy, merge_single=True)
    base = GenRow("Where is Alpha?", [P1, P2], None, 8)
    batch = StepBatch(gen, ON)
    run(batch, [base], [0])
    assert batch.prefixes is not None and len(batch.prefixes) > 0
    reg.begin_batch(["a1"])  # the one adapter, alone: merged
    assert reg.peft_name("a1") is None
    merged = GenRow(base.question, base.passages, None, 8)  # the base's name, a1's weights
    got = run(batch, [merged], [0])[0]
    assert got.reused_tokens == 0 and batch.prefixes.stats.clears == 1
    reg.begin_batch([None])  # a base row: unmerged
    assert reg.peft_name("a1") == a1
    again = run(batch, [base], [0])[0]
    assert again.reused_tokens == 0 and batch.prefixes.stats.clears == 2
    same(again, run(StepBatch(gen), [base], [0])[0])
    assert got.ids != again.ids  # the merged weights really answered otherwise


def test_eviction_mid_run_keeps_answers_exact(tmp_path: Path) -> None:
    gen, _, a1 = setup("llama", tmp_path)
    rows = workload(a1)
    want = run(StepBatch(gen), rows, [0, 1, 2, 3, 4, 5, 6])
    tokens = gen.concat_prompt(rows[0])
    layer = gen.model.config
    per_token = (
        2
        * layer.num_hidden_layers
        * layer.num_key_value_heads
        * (layer.hidden_size // layer.num_attention_heads)
        * 4
    )
    tight = DecodingConfig(prefix_cache_bytes=per_token * BLOCK * 6)  # six blocks
    batch = StepBatch(gen, tight)
    got = run(batch, rows, [0, 1, 2, 3, 4, 5, 6])
    for i in range(len(rows)):
        same(got[i], want[i])
    assert batch.prefixes is not None and batch.prefixes.stats.evictions > 0
    assert batch.prefixes.bytes <= tight.prefix_cache_bytes
    assert len(tokens) > 6 * BLOCK  # one prompt alone outgrows the budget


def test_the_cache_keeps_blocks_exactly_and_evicts_the_least_recent() -> None:
    h, d = 2, 4
    cache = PrefixCache(budget_bytes=3 * 2 * h * BLOCK * d * 4)  # three blocks of one layer
    a = list(range(3 * BLOCK + 1))
    kv = [(torch.randn(h, len(a), d), torch.randn(h, len(a), d))]
    cache.store(None, a, kv)
    assert len(cache) == 3 and cache.bytes == cache.budget
    found = cache.lookup(None, a)
    assert torch.equal(found[0][0], kv[0][0][:, : 3 * BLOCK])
    assert cache.lookup("other-adapter", a) == []  # keyed by the adapter too
    b = [*a[:BLOCK], *(x + 1000 for x in a[BLOCK:])]  # shares the first block only
    assert cache.lookup(None, b)[0][0].shape[1] == BLOCK
    cache.store(None, b, [(torch.randn(h, len(b), d), torch.randn(h, len(b), d))])
    assert cache.stats.evictions == 2 and len(cache) == 3  # a's two oldest-used blocks
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


# ---- blocks shared across adapters below the layers they change ------------------------------


def upper_world(kind: str, tmp: Path, dtype: str = "float32") -> tuple[Generator, list[str]]:
    """A tiny 2-layer generator with two adapters that change layer 1 only."""
    model_dir = BUILDERS[kind](tmp)
    for seed, name in ((1, "u1"), (2, "u2")):
        save_lora_adapter(model_dir, tmp / "adapters" / name, seed=seed, layers=[1])
    gen = load_generator(str(model_dir), cache_dir=tmp, dtype=dtype)
    reg = AdapterRegistry(gen, tmp / "adapters", on_change=lambda m: sync_batched_lora(gen, m))
    names = []
    for name in ("u1", "u2"):
        reg.install(name, reg.prepare(name))
        peft = reg.peft_name(name)
        assert peft is not None
        names.append(peft)
    return gen, names


def across_adapters(u1: str, u2: str) -> list[GenRow]:
    """The same prompts under the base and both adapters, each first seen under another."""
    return [
        GenRow("Where is Alpha?", [P1, P2], None, 8),
        GenRow("Where is Alpha?", [P1, P2], u1, 8),  # the base prefilled it
        GenRow("Who founded Beta?", [P1, P2], u2, 6),  # the same passages, another question
        GenRow("Who founded Beta?", [P1, P2], None, 6),
        GenRow("gamma?", [P3, P1], u1, 6, "token", scores=[1.0, 0.5]),
        GenRow("gamma?", [P3, P1], u2, 6, "token", scores=[0.2, 0.9]),
        GenRow("Lek?", [P1, P2], u2, 5, "sequence", scores=[1.0, 1.0]),
        GenRow("Lek?", [P1, P2], u1, 7),
    ]


@pytest.mark.parametrize("kind", ["llama", "llama-bfloat16", "llama-prefill16"])
def test_adapters_share_the_layers_below_theirs_and_answers_stay_exact(
    kind: str, tmp_path: Path
) -> None:
    """Reference: the cache off. Rows under one adapter take the lower layer's blocks that the
    base's or another adapter's rows computed and run only the upper layer on their hidden
    states; the answers stay those of the cache off, and each row counts half of such a
    block's tokens as reused (one of two layers)."""
    dtype = "bfloat16" if kind == "llama-bfloat16" else "float32"
    prefill = "bfloat16" if kind == "llama-prefill16" else "model"
    gen, (u1, u2) = upper_world("llama", tmp_path, dtype)
    rows = across_adapters(u1, u2)
    join_at = [0, 2, 3, 5, 5, 7, 8, 9]
    want = run(StepBatch(gen, DecodingConfig(prefill_dtype=prefill)), rows, join_at)
    batch = StepBatch(gen, replace(ON, prefill_dtype=prefill))
    got = run(batch, rows, join_at)
    cache = batch.prefixes
    assert cache is not None and (cache.split, cache.layers) == (1, 2)
    for i in range(len(rows)):
        same(got[i], want[i])
    blocks = (got[0].prompt_tokens - 1) // BLOCK * BLOCK
    assert got[0].reused_tokens == 0
    assert got[1].reused_tokens == blocks // 2  # the lower layer of every block, from the base
    assert got[3].reused_tokens > 0 and got[5].reused_tokens > 0 and got[7].reused_tokens > 0
    assert cache.stats.climbed > 0
    assert cache.stats.reused == sum(a.reused_tokens for a in got.values())
    again = run(batch, rows, [0] * len(rows))  # every block whole under every adapter now
    for i in range(len(rows)):
        same(again[i], want[i])
    assert again[1].reused_tokens == blocks


def test_joiners_under_other_adapters_climb_from_what_an_earlier_joiner_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows arriving together whose prompts an earlier joiner under another adapter starts
    with: they wait for a second prefill call, then climb from the lower layer that the first
    call computed (half of each such block's tokens reused, one of two layers), with the
    answers of the cache off."""
    gen, (u1, u2) = upper_world("llama", tmp_path)
    rows = across_adapters(u1, u2)[:3]  # the base, then the same prompts under u1 and u2
    want = run(StepBatch(gen), rows, [0] * len(rows))
    monkeypatch.setattr("app.generation.step_batch.CALL_COST_TOKENS", BLOCK)
    batch = StepBatch(gen, ON)  # a cold cache: only this join's first call fills it
    got = run(batch, rows, [0] * len(rows))
    for i in range(len(rows)):
        same(got[i], want[i])
    blocks = (got[0].prompt_tokens - 1) // BLOCK * BLOCK
    assert got[0].reused_tokens == 0
    assert got[1].reused_tokens == blocks // 2  # the base's lower layer, climbed in call two
    assert got[2].reused_tokens > 0  # the passages, under u2
    assert batch.prefixes is not None and batch.prefixes.stats.climbed > 0


def test_adapters_in_every_layer_or_a_model_that_cannot_climb_keep_blocks_whole(
    tmp_path: Path,
) -> None:
    """GPT-2 adds its positions to what its forward is given, so a forward cannot start at
    layer 1 from the hidden states entering it: the probe says so and nothing is split (the
    answers stay exact and a row under another adapter reuses nothing). Adapters in every
    layer leave nothing to share."""
    gen, (u1, u2) = upper_world("gpt2", tmp_path / "gpt2")
    batch = StepBatch(gen, ON)
    rows = across_adapters(u1, u2)[:2]
    want = run(StepBatch(gen), rows, [0, 1])
    got = run(batch, rows, [0, 1])
    for i in range(len(rows)):
        same(got[i], want[i])
    assert batch.prefixes is not None and batch.prefixes.split == 0
    assert got[1].reused_tokens == 0
    every, _, a1 = setup("llama", tmp_path / "llama")
    batch = StepBatch(every, ON)
    run(batch, [GenRow("Where is Alpha?", [P1, P2], a1, 4)], [0])
    assert batch.prefixes is not None and batch.prefixes.split == 0


def test_a_split_cache_keeps_both_parts_and_climbs_from_the_shared_one() -> None:
    h, d, width = 2, 4, 8
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.clear(split=1, layers=2)
    a = list(range(3 * BLOCK + 1))
    layers = [(torch.randn(h, len(a), d), torch.randn(h, len(a), d)) for _ in range(2)]
    hidden = torch.randn(len(a), width)
    cache.store(None, a, layers, hidden)
    assert len(cache) == 6  # three blocks, each a shared part and the base's own
    whole = cache.lookup(None, a)
    assert len(whole) == 2
    for (k, _), x in zip(whole, layers, strict=True):
        assert torch.equal(k, x[0][:, : 3 * BLOCK])
    assert cache.lookup("other", a) == [] and cache.climb(None, a) is None
    climb = cache.climb("other", a)
    assert climb is not None and (climb.full, climb.shared) == (0, 3 * BLOCK)
    assert torch.equal(climb.hidden, hidden[: 3 * BLOCK])
    assert torch.equal(climb.lower[0][0], layers[0][0][:, : 3 * BLOCK]) and climb.upper == []
    assert cache.covered("other", a) == 3 * BLOCK // 2  # half the layers of three blocks
    cache.store_upper("other", a[: BLOCK + 1], [(layers[1][0][:, :BLOCK], layers[1][1][:, :BLOCK])])
    climb = cache.climb("other", a)
    assert climb is not None and (climb.full, climb.shared) == (BLOCK, 3 * BLOCK)
    assert torch.equal(climb.hidden, hidden[BLOCK : 3 * BLOCK])
    cache.least_climb = 2 * BLOCK + 1  # two blocks to climb are not worth a model call
    assert cache.climb("other", a) is None and cache.covered("other", a) == BLOCK
    cache.least_climb = 2 * BLOCK
    assert cache.climb("other", a) is not None
    cache.store(None, a, layers, hidden[2 * BLOCK :], start=2 * BLOCK)  # nothing new
    assert len(cache) == 7
    b = [*a[: 2 * BLOCK], *(x + 1000 for x in a[2 * BLOCK :])]  # its third block is new
    cache.store(None, b, layers, hidden[BLOCK:], start=BLOCK)
    assert cache.climb("other", b) is not None and len(cache) == 9


# ---- encoder-decoders: an identical input's encoder output -----------------------------------


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return setup(request.param, tmp_path_factory.mktemp(request.param))


def seq2seq_workload(a1: str) -> list[GenRow]:
    """Identical inputs (concat, RAG-Token and RAG-Sequence rows, so per passage too), one
    under another adapter, and a question over the same passages (another input)."""
    return [
        GenRow("Where is Alpha?", [P1, P2], None, 6),
        GenRow("Where is Alpha?", [P1, P2], None, 6),  # the same input: its encoder output
        GenRow("Where is Alpha?", [P1, P2], a1, 6),  # the same ids under other weights
        GenRow("Who founded Beta?", [P1, P2], None, 6),  # another input, same passages
        GenRow("gamma?", [P3, P1], None, 5, "token", scores=[1.0, 0.5]),
        GenRow("gamma?", [P3, P1], None, 5, "token", scores=[0.2, 0.9]),  # same inputs
        GenRow("Lek?", [P1, P2], a1, 5, "sequence", scores=[1.0, 1.0]),
        GenRow("Lek?", [P1, P2], a1, 5, "sequence", scores=[1.0, 0.3]),
    ]


def test_seq2seq_answers_equal_the_cache_off_and_encoder_outputs_serve(seq2seq_world) -> None:
    gen, _, a1 = seq2seq_world
    rows = seq2seq_workload(a1)
    join_at = [0, 2, 2, 0, 3, 5, 1, 4]
    want = run(StepBatch(gen), rows, join_at)
    batch = StepBatch(gen, ON)
    assert batch.prefixes is not None
    got = run(batch, rows, join_at)
    for i in range(len(rows)):
        same(got[i], want[i])
    for i in (1, 5, 7):  # a repeat reuses every token of its inputs
        assert got[i].reused_tokens == got[i].prompt_tokens > 0
    for i in (0, 2, 3, 4, 6):  # first seen, or another adapter's
        assert got[i].reused_tokens == 0
    assert batch.prefixes.stats.reused == sum(a.reused_tokens for a in got.values())
    again = run(batch, rows, [0] * len(rows))  # one join, every input cached now
    for i in range(len(rows)):
        same(again[i], want[i])
        assert again[i].reused_tokens == again[i].prompt_tokens


def test_seq2seq_repeats_within_one_join_encode_once(seq2seq_world, monkeypatch) -> None:
    gen, _, a1 = seq2seq_world
    rows = seq2seq_workload(a1)
    want = run(StepBatch(gen), rows, [0] * len(rows))
    encoded: list[int] = []
    real = gen.family.encode

    def encode(model, ids, mask, extra):
        encoded.append(ids.shape[0])
        return real(model, ids, mask, extra)

    monkeypatch.setattr(gen.family, "encode", encode)
    got = run(StepBatch(gen, ON), rows, [0] * len(rows))
    for i in range(len(rows)):
        same(got[i], want[i])
    assert got[1].reused_tokens == got[1].prompt_tokens and got[0].reused_tokens == 0
    # 8 requests, 12 rows; distinct (adapter, input): 3 concat, 2 token, 2 sequence
    assert encoded == [7]


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_beams_equal_the_cache_off(kind: str, tmp_path: Path) -> None:
    gen, _, a1 = setup(kind, tmp_path)
    rows = [r for r in seq2seq_workload(a1) if r.mode != "concat"]
    join_at = [0, 1, 0, 2]
    beams = DecodingConfig(num_beams=2)
    want = run(StepBatch(gen, beams), rows, join_at)
    got = run(
        StepBatch(gen, DecodingConfig(num_beams=2, prefix_cache_bytes=1 << 26)), rows, join_at
    )
    for i in range(len(rows)):
        same(got[i], want[i])
    assert got[1].reused_tokens == got[1].prompt_tokens and got[3].reused_tokens > 0


def test_seq2seq_hot_swap_between_identical_requests(tmp_path: Path) -> None:
    gen, reg, a1 = setup("t5", tmp_path)
    row = GenRow("Where is Alpha?", [P1, P2], a1, 8)
    base = GenRow("Where is Alpha?", [P1, P2], None, 8)
    batch = StepBatch(gen, ON)
    first = run(batch, [row, base], [0, 0])[0]
    assert batch.prefixes is not None and len(batch.prefixes) == 2
    assert run(batch, [row], [0])[0].reused_tokens == first.prompt_tokens  # it does serve
    reg.install("a1", reg.prepare("a2"))  # same name, other weights
    swapped = reg.peft_name("a1")
    assert swapped is not None
    new_row = GenRow(row.question, row.passages, swapped, 8)
    got = run(batch, [new_row, base], [0, 0])
    want = run(StepBatch(gen), [new_row, base], [0, 0])
    same(got[0], want[0])
    same(got[1], want[1])
    assert got[0].reused_tokens == 0 and batch.prefixes.stats.clears == 0
    assert got[1].reused_tokens == got[1].prompt_tokens  # the base's output outlived the swap
    assert got[0].ids != first.ids  # the weights really changed


def test_seq2seq_eviction_mid_run_keeps_answers_exact(tmp_path: Path) -> None:
    gen, _, a1 = setup("bart", tmp_path)
    rows = seq2seq_workload(a1)
    join_at = list(range(len(rows)))
    want = run(StepBatch(gen), rows, join_at)
    longest = max(len(gen.concat_prompt(r)) for r in rows)
    one = longest * gen.model.config.d_model * 4  # the largest encoder output's bytes
    tight = DecodingConfig(prefix_cache_bytes=int(1.5 * one))  # one input at a time
    batch = StepBatch(gen, tight)
    got = run(batch, rows, join_at)
    for i in range(len(rows)):
        same(got[i], want[i])
    assert batch.prefixes is not None and batch.prefixes.stats.evictions > 0
    assert batch.prefixes.bytes <= tight.prefix_cache_bytes
    assert got[1].reused_tokens == got[1].prompt_tokens  # the entry before it still served


def test_the_cache_keeps_encoder_outputs_by_adapter_and_exact_input() -> None:
    d = 8
    ids = [5, 6, 7, 8]
    hidden = torch.randn(len(ids), d)
    cache = PrefixCache(budget_bytes=2 * hidden.nbytes)
    cache.keep_encoded(None, ids, hidden)
    got = cache.encoded(None, ids)
    assert got is not None and torch.equal(got, hidden)
    assert cache.encoded("a1", ids) is None  # another adapter
    assert cache.encoded(None, ids[:-1]) is None  # a prefix is another input
    assert cache.lookup(None, ids) == []  # an encoder output is no prefix block
    assert (cache.stats.looked_up, cache.stats.reused) == (15, 4)
    cache.keep_encoded(None, [1, 2, 3, 4], torch.randn(len(ids), d))
    cache.encoded(None, ids)  # ids is now the most recent
    cache.keep_encoded(None, [9, 9, 9, 9], torch.randn(len(ids), d))
    assert cache.stats.evictions == 1 and cache.encoded(None, [1, 2, 3, 4]) is None
    assert cache.encoded(None, ids) is not None and cache.bytes == cache.budget


def test_seq2seq_reuse_under_pefts_own_adapter_names(tmp_path: Path) -> None:
    """Without the stacked per-row LoRA, rows get their adapters by PEFT's adapter_names, and
    the encoder run alone is hooked as PEFT's forward would be."""
    gen, _, a1 = setup("t5", tmp_path)
    assert gen.batched is not None
    gen.batched.close()
    gen.batched = None
    rows = seq2seq_workload(a1)
    join_at = [0, 1, 1, 0, 2, 3, 2, 3]
    want = run(StepBatch(gen), rows, join_at)
    got = run(StepBatch(gen, ON), rows, join_at)
    for i in range(len(rows)):
        same(got[i], want[i])
    assert got[1].reused_tokens == got[1].prompt_tokens and got[2].reused_tokens == 0
    assert want[2].ids != want[0].ids  # the adapter changes the answer: the hook applied it


def test_prompt_tokens_counts_what_a_join_computes_after_the_cache(world) -> None:
    """StepBatch.prompt_tokens, what the engine's prefill budget counts: a request's prompt
    tokens, less the prefix the cache holds for it under its adapter, once served."""
    gen, _, a1 = world
    rows = workload(a1)
    cold, warm = StepBatch(gen), StepBatch(gen, ON)
    full = [cold.prompt_tokens(r) for r in rows]
    assert [warm.prompt_tokens(r) for r in rows] == full  # nothing cached yet
    done = run(warm, rows, [0] * len(rows))
    after = [warm.prompt_tokens(r) for r in rows]
    assert [cold.prompt_tokens(r) for r in rows] == full  # the cache off: always the whole
    for i, row in enumerate(rows):
        if row.mode == "concat":  # served whole: every full block but the last token's
            prompt = done[i].prompt_tokens
            assert full[i] == prompt
            assert after[i] == prompt - (prompt - 1) // BLOCK * BLOCK
        else:  # a row per passage, padded to the longest uncached rest
            assert 0 < after[i] < full[i]
    # under an adapter that never ran, the same prompt's blocks are not its own
    other = GenRow(rows[2].question, rows[2].passages, "never-served", rows[2].max_new_tokens)
    assert warm.prompt_tokens(other) == full[2] != after[2]


# ---- prefill in bfloat16 (LORAG_PREFILL_DTYPE=bfloat16) on float32 models --------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5", "bart"])
def test_bfloat16_prefill_keeps_the_cache_exact_and_decodes_in_float32(
    kind: str, tmp_path: Path
) -> None:
    """Prefill calls run under bfloat16 autocast, decoding in float32: with the cache on, every
    answer equals the cache off under the same setting (a hit's suffix prefill and a whole
    prompt's run the same way), and what the cache and the running batch hold is float32."""
    gen, _, a1 = setup(kind, tmp_path)
    rows = seq2seq_workload(a1) if gen.kind == "seq2seq" else workload(a1)
    join_at = [0, 2, 2, 3, 5, 6, 6, 4][: len(rows)]
    bf16 = DecodingConfig(prefill_dtype="bfloat16")
    want = run(StepBatch(gen, bf16), rows, join_at)
    batch = StepBatch(gen, replace(ON, prefill_dtype="bfloat16"))
    got = run(batch, rows, join_at)
    again = run(batch, rows, [0] * len(rows))  # one join, served from the cache
    for i in range(len(rows)):
        same(got[i], want[i])
        same(again[i], want[i])
        assert again[i].reused_tokens > 0
    # the running batch's keys and values are float32 while rows decode
    batch.join([rows[0]], ["x"])
    assert batch._state is not None
    assert {x.keys.dtype for x in batch._state.self_layers()} == {torch.float32}
    assert batch.prefixes is not None
    if gen.kind == "seq2seq":
        held = batch.prefixes.encoded(None, gen.concat_prompt(rows[0]))
        assert held is not None and held.dtype == torch.float32
    else:
        found = batch.prefixes.lookup(None, gen.concat_prompt(rows[0]))
        assert found and found[0][0].dtype == torch.float32
    # and the setting does something: the first token's logits move off float32's, a little
    row = rows[0]
    logits = {}
    for name, config in (("model", DecodingConfig()), ("bfloat16", bf16)):
        probe = StepBatch(gen, config)
        with torch.inference_mode():
            requests = [probe.request(row, 0)]
            _, logits[name] = probe._prefill(requests)
    assert logits["bfloat16"].dtype == torch.float32
    diff = (logits["bfloat16"] - logits["model"]).abs().max()
    assert 0 < diff < 0.1 * logits["model"].abs().max()
