"""The prompt-prefix KV cache (app/generation/prefix_cache.py) in the step batch.

Reference: the same requests with the cache off. With it on, every answer's tokens and passage
weights are the same, for concat, RAG-Token and RAG-Sequence rows, greedy and sampled, rows
joining a running batch at different steps, under adapters, across a hot swap of an adapter
(its old keys and values never serve) and with blocks evicted mid-run; and the cache really
serves (reused tokens counted per answer).
"""

from __future__ import annotations

from collections.abc import Hashable
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


def setup(kind: str, tmp: Path) -> tuple[Generator, AdapterRegistry, str]:
    model_dir = BUILDERS[kind](tmp)
    save_lora_adapter(model_dir, tmp / "adapters" / "a1", seed=1)
    save_lora_adapter(model_dir, tmp / "adapters" / "a2", seed=2)
    gen = load_generator(str(model_dir), cache_dir=tmp)
    reg = AdapterRegistry(gen, tmp / "adapters", on_change=lambda m: sync_batched_lora(gen, m))
    reg.install("a1", reg.prepare("a1"))
    peft = reg.peft_name("a1")
    assert peft is not None
    return gen, reg, peft


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-chat"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return setup(request.param, tmp_path_factory.mktemp(request.param))


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


def test_joiners_that_share_a_prefix_compute_it_once(world, monkeypatch) -> None:
    """Rows arriving together: a repeat of an earlier joiner's prompt waits for a second
    prefill call and reuses the blocks the first call computed, with the same answers."""
    gen, _, a1 = world
    rows = workload(a1)
    want = run(StepBatch(gen), rows, [0] * len(rows))
    monkeypatch.setattr("app.generation.step_batch.FOLLOW_MIN_TOKENS", BLOCK)
    batch = StepBatch(gen, ON)  # a cold cache: nothing is cached before this one join
    got = run(batch, rows, [0] * len(rows))
    for i in range(len(rows)):
        same(got[i], want[i])
    assert got[0].reused_tokens == 0
    assert got[1].reused_tokens == (got[1].prompt_tokens - 1) // BLOCK * BLOCK
    assert got[2].reused_tokens == 0  # another adapter
    assert got[6].reused_tokens > 0  # the passages row 5 (same adapter) computes


def test_a_hot_swap_drops_what_the_old_weights_computed(tmp_path: Path) -> None:
    gen, reg, a1 = setup("llama", tmp_path)
    row = GenRow("Where is Alpha?", [P1, P2], a1, 8)
    batch = StepBatch(gen, ON)
    first = run(batch, [row], [0])[0]
    assert batch.prefixes is not None and len(batch.prefixes) > 0
    reg.install("a1", reg.prepare("a2"))  # same name, other weights
    swapped = reg.peft_name("a1")
    assert swapped is not None
    new_row = GenRow(row.question, row.passages, swapped, 8)
    got = run(batch, [new_row], [0])[0]
    want = run(StepBatch(gen), [new_row], [0])[0]
    same(got, want)
    assert got.reused_tokens == 0 and batch.prefixes.stats.clears >= 1
    assert got.ids != first.ids or got.text != first.text  # the weights really changed


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


def test_encoder_decoders_keep_no_prefixes(tmp_path: Path) -> None:
    gen = load_generator(str(BUILDERS["t5"](tmp_path)), cache_dir=tmp_path)
    assert StepBatch(gen, ON).prefixes is None
