"""The adapter registry against PEFT as the reference, on tiny T5, BART and llama models.

Reference: PeftModel.from_pretrained(base, adapter_dir) on the same input ids. First the tests
show that the adapters really change the output (else every comparison would pass trivially).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from app.contracts import GenRow, Passage
from app.errors import AdapterNotFound, InvalidInputError
from app.generation.generator import Generator
from app.generation.loading import load_generator
from app.generation.step_batch import pad
from app.lora.registry import AdapterRegistry
from tests.tiny import load_tiny, save_lora_adapter, tiny_bart, tiny_gpt2, tiny_llama, tiny_t5

P1 = Passage("a#0", "a", "Alpha", "Alpha is a small town on the river Lek, famous for cheese.")
P2 = Passage("b#0", "b", "Beta", "Beta was founded in 1204 by monks who brewed dark beer there.")
N = 10  # new tokens per row
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "t5": tiny_t5,
    "bart": tiny_bart,
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,  # Conv1D layers
}


@dataclasses.dataclass(frozen=True)
class World:
    model_dir: Path
    root: Path  # adapters root: a1, a2 (same targets, other seeds), a3 (r=4, more targets)


@pytest.fixture(scope="module", params=list(BUILDERS))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = BUILDERS[request.param](tmp)
    root = tmp / "adapters"
    save_lora_adapter(model_dir, root / "a1", seed=1)
    save_lora_adapter(model_dir, root / "a2", seed=2)
    more = {"t5": ["q", "k", "v", "o"], "gpt2": ["c_attn", "c_proj", "c_fc"]}.get(
        request.param, ["q_proj", "k_proj", "v_proj"]
    )
    save_lora_adapter(model_dir, root / "tasks" / "a3", seed=3, r=4, target_modules=more)
    return World(model_dir, root)


@pytest.fixture()
def gen(world: World, tmp_path: Path) -> Generator:
    return load_generator(str(world.model_dir), cache_dir=tmp_path)


@pytest.fixture()
def reg(gen: Generator, world: World) -> AdapterRegistry:
    return AdapterRegistry(gen, world.root)


def load(reg: AdapterRegistry, name: str, rel: str) -> str:
    reg.install(name, reg.prepare(rel))
    return reg.peft_name(name)


def row(adapter: str | None, question: str = "Where is Alpha?") -> GenRow:
    return GenRow(question, [P1, P2], adapter, N)


def ids_and_logits(gen: Generator, model: Any, adapter: str | None) -> tuple[list[int], Any]:
    """Greedy token ids and first-step logits of row(adapter) under model (ours or PEFT's)."""
    r = row(adapter)
    enc = gen._encode([gen.prompt(r.question, r.passages, N)], 10_000)
    ours = model is gen.model
    extra = gen.adapter_kwargs([adapter]) if ours else {}
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gen._greedy(N), **extra)
        inputs = dict(enc)
        if gen.kind == "seq2seq":
            inputs["decoder_input_ids"] = out[:, :4]
        logits = (gen.forward([adapter], **inputs) if ours else model(**inputs)).logits
    start = 1 if gen.kind == "seq2seq" else enc["input_ids"].shape[1]
    return out[0, start:].tolist(), logits


def peft_reference(world: World, rel: str) -> PeftModel:
    return PeftModel.from_pretrained(load_tiny(world.model_dir), world.root / rel).eval()


def n_lora_params(model: torch.nn.Module, internal: str = "") -> int:
    return sum(1 for n, _ in model.named_parameters() if "lora_" in n and internal in n)


def test_served_adapter_equals_peft(gen: Generator, reg: AdapterRegistry, world: World) -> None:
    base_ids, _ = ids_and_logits(gen, gen.model, None)
    for name, rel in [("one", "a1"), ("three", "tasks/a3")]:
        peft = load(reg, name, rel)
        ours_ids, ours_logits = ids_and_logits(gen, gen.model, peft)
        ref_ids, ref_logits = ids_and_logits(gen, peft_reference(world, rel), None)
        assert ours_ids == ref_ids
        assert ours_ids != base_ids  # the adapter really changes the answer
        torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=0)
        assert gen.generate([row(peft)]) == [gen._decode(torch.tensor(ref_ids))]


def test_mixed_batch_gives_each_row_its_adapter(
    gen: Generator, reg: AdapterRegistry, world: World
) -> None:
    p1, p2, p3 = load(reg, "one", "a1"), load(reg, "two", "a2"), load(reg, "three", "tasks/a3")
    same_q = gen.generate([row(None), row(p1), row(p2), row(p3)])
    assert len(set(same_q)) == 4, same_q  # four different models answer differently
    batch = [row(p2), row(None, "Who founded Beta?"), row(p1), row(p3, "When?"), row(p1, "x")]
    together = gen.generate(batch)
    assert together == [gen.generate([r])[0] for r in batch]
    ref = {p: peft_reference(world, rel) for p, rel in [(p1, "a1"), (p2, "a2"), (p3, "tasks/a3")]}
    for r, answer in zip(batch, together, strict=True):
        if r.adapter is None:
            continue
        enc = gen._encode([gen.prompt(r.question, r.passages, N)], 10_000)
        out = ref[r.adapter].generate(**enc, generation_config=gen._greedy(N))
        start = 1 if gen.kind == "seq2seq" else enc["input_ids"].shape[1]
        assert answer == gen._decode(out[0, start:])


def test_unload_frees_weights_and_restores_base(gen: Generator, reg: AdapterRegistry) -> None:
    base_ids, base_logits = ids_and_logits(gen, gen.model, None)
    p1, p2 = load(reg, "one", "a1"), load(reg, "two", "a2")
    two_ids, _ = ids_and_logits(gen, gen.model, p2)
    assert n_lora_params(gen.model, p1) > 0
    reg.unload("one")
    assert n_lora_params(gen.model, p1) == 0
    assert n_lora_params(gen.model, p2) > 0
    assert ids_and_logits(gen, gen.model, p2)[0] == two_ids  # the other adapter still serves
    assert ids_and_logits(gen, gen.model, None)[0] == base_ids
    with pytest.raises(AdapterNotFound):
        gen.generate([row(p1)])
    reg.unload("two")
    assert not isinstance(gen.model, PeftModel)  # unwrapped: the original layers are back
    assert n_lora_params(gen.model) == 0
    ids, logits = ids_and_logits(gen, gen.model, None)
    assert ids == base_ids
    torch.testing.assert_close(logits, base_logits, atol=0, rtol=0)
    assert reg.list() == []
    with pytest.raises(AdapterNotFound, match="'two'"):
        reg.unload("two")


def test_replace_swaps_output(gen: Generator, reg: AdapterRegistry, world: World) -> None:
    info1, replaced1 = reg.install("task", reg.prepare("a1"))
    old = reg.peft_name("task")
    first = gen.generate([row(old)])
    info2, replaced2 = reg.install("task", reg.prepare("a2"))
    new = reg.peft_name("task")
    assert (replaced1, replaced2) == (False, True)
    assert new != old and old not in gen.model.peft_config
    assert n_lora_params(gen.model, old) == 0
    ref_ids, _ = ids_and_logits(gen, peft_reference(world, "a2"), None)
    assert gen.generate([row(new)]) == [gen._decode(torch.tensor(ref_ids))] != first
    assert [i.name for i in reg.list()] == ["task"]
    assert reg.get("task").version == info2.version != info1.version


def test_failed_install_leaves_old_adapter_serving(gen: Generator, reg: AdapterRegistry) -> None:
    base = gen.generate([row(None)])
    good = reg.prepare("a1")
    # a state dict that passed validation but cannot load (as if the file changed under us)
    bad = dataclasses.replace(good, state_dict={k: torch.zeros(3, 3) for k in good.state_dict})
    with pytest.raises(RuntimeError):
        reg.install("task", bad)  # first install: the base must come back unwrapped
    assert not isinstance(gen.model, PeftModel) and n_lora_params(gen.model) == 0
    assert gen.generate([row(None)]) == base and reg.list() == []
    reg.install("task", good)
    peft = reg.peft_name("task")
    served = gen.generate([row(peft)])
    with pytest.raises(RuntimeError):
        reg.install("task", bad)  # replacing: the old one keeps serving
    assert reg.peft_name("task") == peft and list(gen.model.peft_config) == [peft]
    assert gen.generate([row(peft)]) == served


def test_info_names_and_lookups(reg: AdapterRegistry, world: World) -> None:
    info, replaced = reg.install("my.task-1", reg.prepare("tasks/a3"))
    file = world.root / "tasks" / "a3" / "adapter_model.safetensors"
    assert not replaced
    assert (info.name, info.path, info.rank, info.alpha) == ("my.task-1", "tasks/a3", 4, 4.0)
    assert info.bytes == file.stat().st_size
    config = (file.parent / "adapter_config.json").read_bytes()
    digest = hashlib.sha256()
    for part in (config, file.read_bytes()):
        digest.update(len(part).to_bytes(8, "big") + part)
    assert info.version == digest.hexdigest()[:12]
    assert len(info.target_modules) >= 3 and info.base_model == str(world.model_dir)
    assert reg.get("my.task-1") == info and reg.list() == [info]
    for bad in ["", "-x", "a/b", "../x", "x" * 65, "sp ace", "é"]:
        with pytest.raises(InvalidInputError, match="adapter name"):
            reg.install(bad, reg.prepare("a1"))
    for missing in (reg.get, reg.peft_name, reg.unload):
        with pytest.raises(AdapterNotFound, match="'nope'"):
            missing("nope")
    assert reg.list() == [info]


def test_on_change_sees_the_serving_model(gen: Generator, world: World) -> None:
    seen: list[torch.nn.Module] = []
    reg = AdapterRegistry(gen, world.root, on_change=seen.append)
    reg.install("one", reg.prepare("a1"))
    reg.install("one", reg.prepare("a2"))
    reg.unload("one")
    assert [isinstance(m, PeftModel) for m in seen] == [True, True, False]
    assert seen[-1] is gen.model
    with pytest.raises(AdapterNotFound):
        reg.unload("one")
    assert len(seen) == 3  # a refused call changes nothing and reports nothing


def test_forward_on_encoded_pairs_gives_each_row_its_adapter(
    gen: Generator, reg: AdapterRegistry
) -> None:
    """The scoring path RAG decoding uses: one prompt per passage, padded as the family pads,
    then forward with per-row adapters."""
    p1, p2 = load(reg, "one", "a1"), load(reg, "two", "a2")
    adapters = [p1, None, p2, p1]
    prompts = gen.passage_prompts("Where is Alpha?", [P1, P2, P1, P2])
    ids, mask = pad(prompts, gen.pad_id, left=gen.kind == "causal", device=gen.device)
    enc = {"input_ids": ids, "attention_mask": mask}
    inputs = dict(enc)
    if gen.kind == "seq2seq":
        start = gen.model.config.decoder_start_token_id
        inputs["decoder_input_ids"] = torch.full((4, 1), start)
    # [4, V] next-token logits; padding changes the float summation order, hence 5e-4 (the
    # padded T5 rows land up to 1.9e-4 from their unpadded forward; the two adapters move the
    # same row's logits by far more, checked last)
    together = gen.forward(adapters, **inputs).logits[:, -1]
    for i, adapter in enumerate(adapters):
        alone = {k: v[i : i + 1, -int(enc["attention_mask"][i].sum()) :] for k, v in enc.items()}
        if gen.kind == "seq2seq":  # right padding: the real tokens come first
            alone = {k: v[i : i + 1, : int(enc["attention_mask"][i].sum())] for k, v in enc.items()}
            alone["decoder_input_ids"] = inputs["decoder_input_ids"][i : i + 1]
        torch.testing.assert_close(
            gen.forward([adapter], **alone).logits[0, -1], together[i], atol=5e-4, rtol=5e-4
        )
    assert not torch.allclose(together[0], together[2], atol=1e-2)  # P1 under a1 vs a2
