"""BatchedLora against the reference: PEFT's own `adapter_names` mixed batch.

Each model (T5, BART, llama) holds three real PEFT adapters saved in the PEFT format: rank 4
on PEFT's default targets (attention q and v, cross-attention included), rank 8 on every linear
layer of the blocks, and rank 2 on one module type only, with different scalings, so that
layers hold different sets of adapters at different ranks. The tests first prove that the adapters
really change the output, then that BatchedLora's logits and greedy tokens equal PEFT's.

Exactness is checked in float64 (the models and adapters converted), where rounding cannot hide
a wrong row, slot, rank or scaling: the tolerance is 1e-5 and the measured error ~1e-12. In
float32 the batched matmuls accumulate in another order than PEFT's per-adapter sub-batches, and
these tiny models (weights initialized with a large spread) amplify rounding: on the tiny T5,
PEFT's own mixed batch differs from its one-adapter batch by 3e-4 and BatchedLora from PEFT by
6e-4 (logits up to 63); float32 is therefore checked relative to the largest logit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from app.errors import AdapterNotFound
from app.lora import batched
from app.lora.batched import BASE, BatchedLora, RowPlan
from tests.tiny import VOCAB, load_tiny, save_lora_adapter, tiny_bart, tiny_llama, tiny_t5

ATOL = 1e-5  # float64
F32_REL = 2e-5  # float32: times the largest |logit|
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "t5": tiny_t5,
    "bart": tiny_bart,
    "llama": tiny_llama,
}
ONE_MODULE = {"t5": ["v"], "bart": ["v_proj"], "llama": ["v_proj"]}
ALL_LINEAR = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
MIXED = ["a", BASE, "b", "c", "a", "b"]


@pytest.fixture(scope="module", params=list(BUILDERS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(arch, model folder, {adapter name: adapter folder})."""
    arch: str = request.param
    root = tmp_path_factory.mktemp(arch)
    model_dir = BUILDERS[arch](root)
    adapters = {
        "a": save_lora_adapter(model_dir, root / "a", r=4, seed=1, lora_alpha=8),
        "b": save_lora_adapter(model_dir, root / "b", r=8, seed=2, target_modules=ALL_LINEAR[arch]),
        "c": save_lora_adapter(
            model_dir, root / "c", r=2, seed=3, target_modules=ONE_MODULE[arch], lora_alpha=5
        ),
    }
    return arch, model_dir, adapters


def load(saved: tuple[str, Path, dict[str, Path]], dtype: torch.dtype = torch.float64) -> PeftModel:
    """A fresh copy of the tiny model with adapters a, b, c, in dtype (float64 unless said)."""
    _, model_dir, adapters = saved
    key = (model_dir, dtype)
    if key not in _LOADED:  # loading is the slow part of these tests; copying is fast
        model = PeftModel.from_pretrained(load_tiny(model_dir), adapters["a"], "a")
        for name in ("b", "c"):
            model.load_adapter(adapters[name], adapter_name=name)
        _LOADED[key] = model.to(dtype).eval()
    return copy.deepcopy(_LOADED[key])


_LOADED: dict[tuple[Path, torch.dtype], PeftModel] = {}


def inputs(model: PeftModel, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, as a real batch has
    kw = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.randint(3, VOCAB, (rows, 5), generator=g)
    return kw


def peft_logits(model: PeftModel, kw: dict[str, Any], names: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(**kw, adapter_names=names).logits
    return logits


def batched_logits(
    lora: BatchedLora, kw: dict[str, Any], names: list[str | None] | list[str] | RowPlan
) -> torch.Tensor:
    with torch.inference_mode(), lora.rows(names):
        logits: torch.Tensor = lora.model(**kw).logits
    return logits


def generate_kwargs(kw: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    prompt = {k: v for k, v in kw.items() if k != "decoder_input_ids"}
    return {**prompt, "max_new_tokens": 6, "do_sample": False, **extra}


def test_adapters_really_differ(saved) -> None:
    model = load(saved)
    kw = inputs(model, 4)
    per = {n: peft_logits(model, kw, [n] * 4) for n in (BASE, "a", "b", "c")}
    for name in ("a", "b", "c"):
        assert (per[name] - per[BASE]).abs().max() > 0.1, name
    assert (per["a"] - per["b"]).abs().max() > 0.1
    # and PEFT's mixed batch (the reference below) really is per row; its sub-batches round
    # differently from a full batch, hence the looser tolerance here
    mixed = peft_logits(model, kw, [BASE, "a", "b", "c"])
    for i, name in enumerate((BASE, "a", "b", "c")):
        torch.testing.assert_close(mixed[i], per[name][i], atol=1e-3, rtol=1e-3)


def test_mixed_batch_logits_equal_peft(saved) -> None:
    model = load(saved)
    kw = inputs(model, len(MIXED))
    ref = peft_logits(model, kw, MIXED)
    lora = BatchedLora(model)
    torch.testing.assert_close(batched_logits(lora, kw, MIXED), ref, atol=ATOL, rtol=ATOL)
    # None is the base too
    nones = [None if n == BASE else n for n in MIXED]
    torch.testing.assert_close(batched_logits(lora, kw, nones), ref, atol=ATOL, rtol=ATOL)


def test_mixed_batch_x_at_a_orientation_equals_peft(saved, monkeypatch) -> None:
    """From BMM_XA_RANK up a mixed batch computes x @ A.T per row instead of A @ x.T; the test
    adapters' ranks (2 to 8) are below it, so lower the threshold to run that branch."""
    monkeypatch.setattr(batched, "BMM_XA_RANK", 1)
    model = load(saved)
    kw = inputs(model, len(MIXED), seed=11)
    ref = peft_logits(model, kw, MIXED)
    got = batched_logits(BatchedLora(model), kw, MIXED)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("names", [["b"] * 3, ["c"] * 3, [BASE] * 3, ["a", "a", BASE]])
def test_uniform_batches_equal_peft(saved, names: list[str]) -> None:
    """The fast paths: one adapter for all rows, all base, one adapter plus base rows."""
    model = load(saved)
    kw = inputs(model, len(names), seed=1)
    ref = peft_logits(model, kw, names)
    got = batched_logits(BatchedLora(model), kw, names)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("names", [MIXED, ["c"] * 6])
def test_float32_close_to_peft(saved, names: list[str]) -> None:
    model = load(saved, torch.float32)
    kw = inputs(model, len(names), seed=7)
    ref = peft_logits(model, kw, names)
    got = batched_logits(BatchedLora(model), kw, names)
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, atol=F32_REL * scale, rtol=0)


def test_without_gather_cache_equal_peft(saved) -> None:
    model = load(saved)
    kw = inputs(model, len(MIXED), seed=2)
    ref = peft_logits(model, kw, MIXED)
    got = batched_logits(BatchedLora(model, gather_cache_bytes=0), kw, MIXED)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)


def test_greedy_generate_equals_peft(saved) -> None:
    model = load(saved)
    kw = generate_kwargs(inputs(model, len(MIXED), seed=3))
    lora = BatchedLora(model)
    with torch.inference_mode():
        ref = model.generate(**kw, adapter_names=MIXED)
        with lora.rows(MIXED):
            got = model.generate(**kw)
    assert torch.equal(got, ref)


def test_beam_search_rows_follow_their_adapter(saved) -> None:
    """generate repeats each row num_beams times; every copy keeps the row's adapter."""
    model = load(saved)
    names = ["a", "b", BASE]
    kw = generate_kwargs(inputs(model, 3, seed=4), num_beams=3, num_return_sequences=2)
    lora = BatchedLora(model)
    with torch.inference_mode():
        ref = model.generate(**kw, adapter_names=names)  # PEFT expands names by num_beams
        with lora.rows(names):
            got = model.generate(**kw)
    assert got.shape[0] == 6
    assert torch.equal(got, ref)


FEW = ["a", "b", BASE, "a", "a", "c", BASE, "b", "a"]  # 3 adapters in 9 rows: dense steps


@pytest.mark.parametrize(("names", "beams"), [(FEW, 1), (["a", "b"] * 3, 1), (["a", "a", BASE], 3)])
def test_decoding_steps_with_few_adapters_equal_peft(saved, names: list[str], beams: int) -> None:
    """A decoding step of a batch with few distinct adapters (rows >= 3x adapters) takes the
    dense products (D adapters side by side, a per-row mask): every step's logits equal PEFT's,
    with scalings that differ between the adapters (FEW) or not, and under beam search, where
    each row is repeated."""
    model = load(saved)
    kw = generate_kwargs(
        inputs(model, len(names), seed=5),
        num_beams=beams,
        output_logits=True,
        return_dict_in_generate=True,
    )
    lora = BatchedLora(model)
    plan = lora.plan(names)
    assert plan.dense_slots is not None
    with torch.inference_mode():
        ref = model.generate(**kw, adapter_names=names)
        with lora.rows(plan):
            got = model.generate(**kw)
    assert plan._dense and plan._masks  # the steps used them
    assert torch.equal(got.sequences, ref.sequences)
    for step_got, step_ref in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(step_got, step_ref, atol=ATOL, rtol=ATOL)


def test_dense_steps_without_a_cache_equal_peft(saved) -> None:
    model = load(saved)
    kw = generate_kwargs(inputs(model, len(FEW), seed=6), output_logits=True)
    kw["return_dict_in_generate"] = True
    lora = BatchedLora(model, gather_cache_bytes=0)
    plan = lora.plan(FEW)
    assert plan.dense_slots is not None and not plan.cache_dense
    with torch.inference_mode():
        ref = model.generate(**kw, adapter_names=FEW)
        with lora.rows(plan):
            got = model.generate(**kw)
    assert not plan._dense  # nothing kept
    for step_got, step_ref in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(step_got, step_ref, atol=ATOL, rtol=ATOL)


def test_many_adapters_per_row_keep_the_gathered_products(saved) -> None:
    plan = BatchedLora(load(saved)).plan(MIXED)  # 3 adapters in 6 rows
    assert plan.dense_slots is None


def test_plans_reused_across_calls_keep_their_rows(saved) -> None:
    """A plan is reused for many model calls (a decoding loop) while other plans come and go;
    each keeps its own rows' gathered weights."""
    model = load(saved)
    lora = BatchedLora(model)
    kw = inputs(model, len(MIXED), seed=12)
    other = ["c", "b", "a", BASE, "c", "a"]
    ref, ref_other = peft_logits(model, kw, MIXED), peft_logits(model, kw, other)
    first = lora.plan(MIXED)
    for _ in range(2):
        torch.testing.assert_close(batched_logits(lora, kw, first), ref, atol=ATOL, rtol=ATOL)
    gone = lora.plan(other)
    batched_logits(lora, kw, gone)
    del gone
    second = lora.plan(other)
    torch.testing.assert_close(batched_logits(lora, kw, second), ref_other, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(batched_logits(lora, kw, first), ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(batched_logits(lora, kw, second), ref_other, atol=ATOL, rtol=ATOL)


def test_delete_and_install_then_refresh(saved) -> None:
    _, _, adapters = saved
    model = load(saved)
    lora = BatchedLora(model)
    kw = inputs(model, 4, seed=5)

    model.delete_adapter("b")
    lora.refresh()
    names = ["a", BASE, "c", "a"]
    ref = peft_logits(model, kw, names)
    torch.testing.assert_close(batched_logits(lora, kw, names), ref, atol=ATOL, rtol=ATOL)
    with pytest.raises(AdapterNotFound, match="'b'"), lora.rows(["b", "a", "a", "a"]):
        pass

    # installed again under a new name: rows() notices the new name even without refresh()
    model.load_adapter(adapters["b"], adapter_name="b2")
    names = ["b2", "a", BASE, "c"]
    ref = peft_logits(model, kw, names)
    torch.testing.assert_close(batched_logits(lora, kw, names), ref, atol=ATOL, rtol=ATOL)


def test_peft_paths_unchanged_outside_rows(saved) -> None:
    model = load(saved)
    kw = inputs(model, len(MIXED), seed=6)
    before_mixed = peft_logits(model, kw, MIXED)
    model.set_adapter("b")
    with torch.inference_mode():
        before_active = model(**kw).logits
    lora = BatchedLora(model)
    with torch.inference_mode():
        assert torch.equal(model(**kw).logits, before_active)
    assert torch.equal(peft_logits(model, kw, MIXED), before_mixed)
    lora.close()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(peft_logits(model, kw, MIXED), before_mixed)


def test_embedding_lora_falls_back_to_peft(tmp_path: Path) -> None:
    """A LoRA Embedding layer (not stackable) runs PEFT's own per-row path inside rows()."""
    model_dir = tiny_llama(tmp_path)
    targets = ["embed_tokens", "q_proj", "v_proj"]
    a = save_lora_adapter(model_dir, tmp_path / "a", r=4, seed=7, target_modules=targets)
    b = save_lora_adapter(model_dir, tmp_path / "b", r=8, seed=8, target_modules=targets)
    model = PeftModel.from_pretrained(load_tiny(model_dir), a, "a")
    model.load_adapter(b, adapter_name="b")
    model.to(torch.float64).eval()
    kw = inputs(model, 4, seed=9)
    names = ["a", "b", BASE, "b"]
    ref = peft_logits(model, kw, names)
    lora = BatchedLora(model)
    assert sum(not layer.stackable for layer in lora._layers.values()) == 1
    torch.testing.assert_close(batched_logits(lora, kw, names), ref, atol=ATOL, rtol=ATOL)


def test_refusals(saved) -> None:
    model = load(saved)
    lora = BatchedLora(model)
    kw = inputs(model, 3, seed=10)
    with pytest.raises(AdapterNotFound, match="'nope'"), lora.rows(["a", "nope", "b"]):
        pass
    with pytest.raises(ValueError, match="at least one row"), lora.rows([]):
        pass
    with lora.rows(["a", "b", "c"]), pytest.raises(RuntimeError, match="nest"), lora.rows(["a"]):
        pass
    with (
        torch.inference_mode(),
        lora.rows(["a", "b"]),
        pytest.raises(ValueError, match="not a multiple of the 2 rows"),
    ):
        model(**kw)
    with (
        torch.inference_mode(),
        lora.rows(["a", "b", "c"]),
        pytest.raises(ValueError, match="adapter_names"),
    ):
        model(**kw, adapter_names=["a", "b", "c"])
    model.train()
    with pytest.raises(ValueError, match="eval mode"), lora.rows(["a", "b", "c"]):
        pass
